//! The `outpost` command line: parse flags, build a config, call into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use outpost::app::{App, StartError};
use outpost::config::{Backend, Config};
use outpost::shutdown::Shutdown;

// A proxy allocates and frees many small buffers per request; mimalloc does that with less
// contention between worker threads than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (its Rust bindings name no constant
/// for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc v3's default purge delay, in ms: checked before the option is set, so that a
/// different option order (another mimalloc) or an operator's `MIMALLOC_PURGE_DELAY` (any
/// value but this one) is left alone.
const MI_DEFAULT_PURGE_DELAY: std::ffi::c_long = 1000;

/// Hand memory the process frees back to the OS within ~10 ms (mimalloc v2's default) instead
/// of mimalloc v3's 1 s (10 s for its arenas). Under a burst of large bodies the retained
/// memory came on top of what the configured limits bound: the 10× burst bench peaked at
/// 250–297 MB against its 279 MB bound, and at 212–248 MB with 10 ms, with the same write and
/// pass-through throughput (README, "Benchmarks").
#[allow(unsafe_code)]
fn return_freed_memory_promptly() {
    // SAFETY: `mi_option_get` and `mi_option_set` read and write an entry of mimalloc's option
    // table (any index below `_mi_option_last`, which 15 is in every mimalloc with this enum);
    // called first thing in `main`, before any other thread of this program exists.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10);
        }
    }
}

/// An offline-first sync proxy: transparent while the upstream answers, serving reads from its
/// cache and queueing writes durably while it does not, replaying them in order when it is back.
#[derive(Parser)]
#[command(name = "outpost", version, about)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// A self-contained showcase: a toy upstream, outpost in front, an outage and the replay.
    Demo,
    /// Validate a config file (errors name the file, line and key; exit 2).
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Operate on a running instance through its admin API (token from OUTPOST_ADMIN_TOKEN).
    /// Exit codes: 0 done, 1 not found / refused / unreachable, 2 usage.
    Queue(QueueArgs),
    /// Replay a HAR file as load against a target (exit 2 on a bad file or flags, 1 when a
    /// mutation was lost or applied twice).
    Loadtest(outpost::loadtest::LoadtestArgs),
}

#[derive(clap::Args)]
struct QueueArgs {
    /// Admin API base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9901")]
    admin: String,
    /// Print the admin API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: QueueAction,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Pending mutations, oldest first per partition.
    List,
    /// One mutation's status document, whatever its state.
    Show {
        /// Its idempotency key.
        key: String,
    },
    /// Send a pending mutation now, or put a dead letter back at the tail of its partition
    /// (edited with --body / --header: a new key when the body changes).
    Retry {
        /// Its idempotency key.
        key: String,
        /// New body for a dead letter (JSON is sent as given; anything else as text).
        #[arg(long)]
        body: Option<String>,
        /// Header to set on a dead letter (`Name: value`; `Name:` removes it); repeatable.
        #[arg(long = "header", value_name = "NAME: VALUE")]
        headers: Vec<String>,
    },
    /// Drop a pending mutation or a dead letter (kept as rejected, "dropped by operator").
    Drop {
        /// Its idempotency key.
        key: String,
    },
    /// The dead-letter list, with the upstream's answers.
    DeadLetters,
    /// Pause replay.
    Pause,
    /// Resume replay.
    Resume,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (defaults are used for everything it leaves out).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Proxy listen address (overrides proxy.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Upstream base URL (overrides upstream.url).
    #[arg(long)]
    upstream: Option<String>,
    /// Admin listen address (overrides admin.listen).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Data directory of the embedded store (overrides store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use the Redis backend at this URL (sets store.backend = "redis").
    #[arg(long)]
    redis: Option<String>,
    /// Record the traffic as HAR 1.2 to this file (sets proxy.record_har).
    #[arg(long, value_name = "FILE.har")]
    record: Option<PathBuf>,
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
    let cli = Cli::parse();
    // The demo narrates on stdout; its logs stay quiet unless RUST_LOG asks.
    let default_level = if matches!(
        cli.command,
        Command::Demo | Command::Queue(_) | Command::Loadtest(_)
    ) {
        "error"
    } else {
        "info"
    };
    // Held to the end of main: dropping it writes out the log lines still buffered.
    let _log = init_logging(cli.log_format, default_level);
    match cli.command {
        Command::CheckConfig { file } => match outpost::route::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => {
            let config = match build_config(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            run(|| async move {
                let shutdown = Shutdown::new();
                shutdown.trigger_on_signals();
                let app = App::start(config, shutdown).await?;
                app.wait().await;
                Ok(())
            })
        }
        Command::Queue(args) => queue(args),
        Command::Loadtest(args) => ExitCode::from(outpost::loadtest::main(args)),
        Command::Demo => run(|| async { outpost::demo::run().await.map_err(StartError::Demo) }),
    }
}

fn run<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), StartError>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {}", outpost::error::report(&e));
            ExitCode::FAILURE
        }
    }
}

fn queue(args: QueueArgs) -> ExitCode {
    use outpost::admin::client::{self, Command as Q};
    let command = match args.action {
        QueueAction::List => Q::List,
        QueueAction::Show { key } => Q::Show(key),
        QueueAction::Retry { key, body, headers } => {
            let mut edit = serde_json::Map::new();
            if let Some(body) = body {
                // JSON stays JSON; anything else is sent as text.
                let value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
                edit.insert("body".into(), value);
            }
            let mut set = serde_json::Map::new();
            for h in headers {
                let Some((name, value)) = h.split_once(':') else {
                    eprintln!("error: --header {h:?} is not `Name: value`");
                    return ExitCode::from(2);
                };
                let value = value.trim();
                let value = if value.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::Value::String(value.to_string())
                };
                set.insert(name.trim().to_string(), value);
            }
            if !set.is_empty() {
                edit.insert("headers".into(), serde_json::Value::Object(set));
            }
            let edit = (!edit.is_empty()).then_some(serde_json::Value::Object(edit));
            Q::Retry { key, edit }
        }
        QueueAction::Drop { key } => Q::Drop(key),
        QueueAction::DeadLetters => Q::DeadLetters,
        QueueAction::Pause => Q::Pause,
        QueueAction::Resume => Q::Resume,
    };
    let token = std::env::var("OUTPOST_ADMIN_TOKEN").ok();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(client::run(
        &args.admin,
        token.as_deref(),
        &command,
        args.json,
    )) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn build_config(args: ServeArgs) -> Result<Config, outpost::config::ConfigError> {
    let mut config = match &args.config {
        // Routes included: their errors name file, line and key too.
        Some(path) => outpost::route::load(path)?.0,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.proxy.listen = listen;
    }
    if let Some(url) = args.upstream {
        config.upstream.url = url;
    }
    if let Some(admin) = args.admin_listen {
        config.admin.listen = admin;
    }
    if let Some(dir) = args.data_dir {
        config.store.data_dir = dir;
    }
    if let Some(path) = args.record {
        config.proxy.record_har = Some(path);
    }
    if let Some(url) = args.redis {
        config.store.backend = Backend::Redis;
        config.store.redis_url = url;
    }
    if let Ok(token) = std::env::var("OUTPOST_ADMIN_TOKEN")
        && !token.is_empty()
    {
        config.admin.token = Some(token);
    }
    if let Ok(password) = std::env::var("OUTPOST_REDIS_SENTINEL_PASSWORD")
        && !password.is_empty()
    {
        config.store.redis_sentinel_password = password;
    }
    // Flags may make a valid file invalid (or the reverse): validate the result.
    config.validate().map_err(|mut e| {
        e.file = args.config.clone();
        e
    })?;
    Ok(config)
}

/// How long the log thread rests after writing a batch, so that the next lines gather in its
/// channel meanwhile.
const LOG_BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// The log thread's writer: what it takes off its channel in one go reaches stderr in one
/// write(2), after which the thread rests for [`LOG_BATCH_PAUSE`]. Without the rest the thread
/// took each line as it came: at 37 k queued writes a second (one `queued` line each) that was a
/// write(2), a `sched_yield` and often a futex wake-up per line (strace). A line written after
/// a quiet spell goes out at once; under load a line waits at most the pause.
struct Batched<W: std::io::Write>(std::io::BufWriter<W>);

impl<W: std::io::Write> std::io::Write for Batched<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let wrote = !self.0.buffer().is_empty();
        self.0.flush()?;
        if wrote {
            std::thread::sleep(LOG_BATCH_PAUSE);
        }
        Ok(())
    }
}

/// Logs go to stderr through a writer thread: a request never waits on a write(2) of its own
/// log line (at tens of thousands of queued writes a second, one line each, that was a system
/// call and a lock on every request). Lines are buffered and written in batches; none is dropped
/// (`lossy(false)`: when 8 192 lines are waiting, about 1 MB, the emitting thread waits for the
/// writer instead, as it did before; memory stays bounded).
fn init_logging(
    format: LogFormat,
    default_level: &str,
) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for people at a terminal: a file or a log collector gets plain text.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(8192)
        .thread_name("outpost-log")
        .finish(Batched(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        )));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
