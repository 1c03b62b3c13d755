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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; its logs stay quiet unless RUST_LOG asks.
    let default_level = if matches!(cli.command, Command::Demo) {
        "error"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
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
    if let Some(url) = args.redis {
        config.store.backend = Backend::Redis;
        config.store.redis_url = url;
    }
    if let Ok(token) = std::env::var("OUTPOST_ADMIN_TOKEN")
        && !token.is_empty()
    {
        config.admin.token = Some(token);
    }
    // Flags may make a valid file invalid (or the reverse): validate the result.
    config.validate().map_err(|mut e| {
        e.file = args.config.clone();
        e
    })?;
    Ok(config)
}

fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for people at a terminal: a file or a log collector gets plain text.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
