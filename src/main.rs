use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use proxmoxer::config::{Config, LogFormat};

// Checks allocate and free connection buffers all day; mimalloc handles that churn with a
// fraction of glibc's per-check cost (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps a registry of Proxmox VE clusters and monitors their health over a REST API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML configuration file (see config/proxmoxer.toml).
    #[arg(long, global = true, env = "PROXMOXER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the configuration and exit; non-zero with the offending key if it is invalid.
    CheckConfig,
    /// Print the SHA-256 fingerprint of the certificate a Proxmox node presents, in the form
    /// registration accepts. Compare it with the node's before pinning it.
    Fingerprint {
        /// The node's API URL, e.g. https://pve1.example.com:8006
        url: String,
    },
    /// Create a new credential key file (mode 0600), e.g. for systemd's LoadCredential=.
    GenerateKey {
        /// Where to write it; an existing file is never overwritten.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::CheckConfig => check_config(cli.config),
        Command::Fingerprint { url } => fingerprint(&url),
        Command::GenerateKey { path } => match proxmoxer::secrets::Vault::create(&path) {
            Ok(_) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.to_string()),
        },
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("proxmoxer: {message}");
    ExitCode::FAILURE
}

fn load_config(path: Option<PathBuf>) -> Result<Config, ExitCode> {
    Config::load(path.as_deref()).map_err(|e| {
        eprintln!("proxmoxer: {e}");
        ExitCode::from(2)
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(&format!("cannot start the async runtime: {e}")))
}

fn run(config_path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(e) = init_tracing(&config.log_level, config.log_format) {
        eprintln!("proxmoxer: {e}");
        return ExitCode::from(2);
    }
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let shutdown =
            shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        proxmoxer::run(config, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged, not printed: with log.format = "json" every stderr line stays JSON.
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(config_path: Option<PathBuf>) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(e) = log_filter(&config.log_level) {
        eprintln!("proxmoxer: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = proxmoxer::tls::TrustAnchors::load(config.tls_ca_file.as_deref(), false) {
        eprintln!("proxmoxer: {e}");
        return ExitCode::from(2);
    }
    println!("configuration is valid");
    println!("  listen            {}", config.listen);
    println!("  database          {}", config.database.display());
    println!("  key file          {}", config.key_file.display());
    println!(
        "  monitor           every {}, unhealthy after {} failed checks",
        humantime::format_duration(config.monitor_interval),
        config.failure_threshold
    );
    println!(
        "  proxmox timeout   {}",
        humantime::format_duration(config.proxmox_timeout)
    );
    ExitCode::SUCCESS
}

fn fingerprint(url: &str) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(proxmoxer::tls::presented_fingerprint(
        url,
        Duration::from_secs(10),
    )) {
        Ok(fingerprint) => {
            println!("{fingerprint}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `RUST_LOG` when set, else the configured level.
fn log_filter(level: &str) -> Result<EnvFilter, String> {
    match std::env::var("RUST_LOG") {
        Ok(filter) if !filter.is_empty() => {
            EnvFilter::try_new(&filter).map_err(|e| format!("invalid value for RUST_LOG: {e}"))
        }
        _ => EnvFilter::try_new(level).map_err(|e| format!("invalid value for log.level: {e}")),
    }
}

fn init_tracing(level: &str, format: LogFormat) -> Result<(), String> {
    let filter = log_filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // journald stamps each line itself.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal during start-up is not lost.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {},
            _ = interrupt.recv() => {},
        }
    })
}
