use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use proxmoxer::api::auth::Keyring;
use proxmoxer::api::token_file::{self, Role, TokenSet};
use proxmoxer::cli::{client::Daemon, status, watch};
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
    /// Manage the bearer tokens of the API. A running daemon picks up changes on SIGHUP.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show every cluster in a table, worst first. Exit code as a Nagios plugin: 0 all
    /// healthy, 1 any degraded, 2 any unhealthy or unknown, 3 no answer from the daemon.
    Status {
        #[command(flatten)]
        daemon: DaemonArg,
        /// Print a JSON object instead: state, exit_code, total, counts and clusters.
        #[arg(long)]
        json: bool,
    },
    /// Copy a redb registry into etcd (storage.etcd.* and the key file from the
    /// configuration). Clusters keep their ids, so a second run copies nothing twice; a
    /// different cluster of the same name in etcd stops it.
    Migrate {
        /// The redb database to copy, e.g. /var/lib/proxmoxer/proxmoxer.redb (the daemon
        /// using it must be stopped).
        #[arg(long = "from-redb", value_name = "PATH")]
        from_redb: PathBuf,
    },
    /// Print a line whenever a cluster is registered, deregistered or changes status, until
    /// interrupted.
    Watch {
        #[command(flatten)]
        daemon: DaemonArg,
    },
}

#[derive(Args)]
struct DaemonArg {
    /// The daemon's address, e.g. http://127.0.0.1:8080; default: the configured server.listen.
    #[arg(long)]
    url: Option<String>,
    /// An API token (a read token is enough); prefer PROXMOXER_TOKEN, which `ps` does not show.
    #[arg(long, env = "PROXMOXER_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Add a token and print its secret, once; only its hash is stored.
    Add {
        /// 1 to 64 characters out of A-Z, a-z, 0-9, `_`, `.` and `-`.
        name: String,
        /// `read`: GET and HEAD (reads, events, metrics); `admin`: everything.
        #[arg(long, value_enum)]
        role: RoleArg,
        #[command(flatten)]
        file: TokensFileArg,
    },
    /// List the tokens' names and roles.
    List {
        #[command(flatten)]
        file: TokensFileArg,
    },
    /// Remove a token.
    Remove {
        /// The token's name.
        name: String,
        #[command(flatten)]
        file: TokensFileArg,
    },
}

#[derive(Args)]
struct TokensFileArg {
    /// The API tokens file; default: the configuration's api.tokens_file.
    #[arg(long, env = "PROXMOXER_API_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Read,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Read => Role::Read,
            RoleArg::Admin => Role::Admin,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
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
        Command::Token(command) => token(command, cli.config),
        Command::Status { daemon, json } => {
            match Daemon::resolve(daemon.url, daemon.token, cli.config.as_deref()) {
                Ok(daemon) => status::run(&daemon, json),
                Err(e) => status::no_answer(&e),
            }
        }
        Command::Migrate { from_redb } => migrate(cli.config, &from_redb),
        Command::Watch { daemon } => {
            match Daemon::resolve(daemon.url, daemon.token, cli.config.as_deref()) {
                Ok(daemon) => watch::run(&daemon),
                Err(e) => status::no_answer(&e),
            }
        }
    }
}

/// Prints clap's message. `status` answers a wrong command line with 3 (UNKNOWN), as a
/// Nagios plugin must, where clap's usual 2 would read as CRITICAL.
fn usage_error(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if !error.use_stderr() {
        // --help and --version.
        return ExitCode::SUCCESS;
    }
    let invoked = Cli::command().ignore_errors(true).try_get_matches();
    if invoked.is_ok_and(|matches| matches.subcommand_name() == Some("status")) {
        return status::no_answer_code();
    }
    ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
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
            proxmoxer::stop_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let reloads =
            reload_requests().map_err(|e| format!("cannot install signal handlers: {e}"))?;
        proxmoxer::run(config, shutdown, reloads)
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
    let keyring = match Keyring::load(
        config.api_tokens_file.as_deref(),
        config.listen,
        config.api_allow_unauthenticated,
    ) {
        Ok(keyring) => keyring,
        Err(e) => {
            eprintln!("proxmoxer: {e}");
            return ExitCode::from(2);
        }
    };
    if config.backend == proxmoxer::config::StorageBackend::Etcd && !cfg!(feature = "etcd") {
        eprintln!("proxmoxer: {}", proxmoxer::StartupError::EtcdNotBuilt);
        return ExitCode::from(2);
    }
    println!("configuration is valid");
    println!("  listen            {}", config.listen);
    match config.backend {
        proxmoxer::config::StorageBackend::Redb => {
            println!("  storage           redb {}", config.database.display());
        }
        proxmoxer::config::StorageBackend::Etcd => {
            println!(
                "  storage           etcd {} under {}, leader lease {}",
                config.etcd.endpoints.join(","),
                config.etcd.prefix,
                humantime::format_duration(config.etcd.lease_ttl),
            );
        }
    }
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
    let tokens = keyring.tokens().len();
    match (&config.api_tokens_file, tokens) {
        (Some(file), 1..) => println!(
            "  api tokens        {tokens} from {}: all but GET /health and the status page need one",
            file.display()
        ),
        (_, 0) if proxmoxer::api::auth::is_loopback(&config.listen) => {
            println!("  api tokens        none: the API is open to local clients");
        }
        _ => println!(
            "  api tokens        none: the API is open to anyone who can reach it \
             (api.allow_unauthenticated)"
        ),
    }
    ExitCode::SUCCESS
}

fn migrate(config_path: Option<PathBuf>, database: &std::path::Path) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(proxmoxer::migrate::from_redb(&config, database)) {
        Ok(report) => {
            println!(
                "copied {} cluster(s) from {} into etcd ({} under {}); {} were there already",
                report.copied,
                database.display(),
                config.etcd.endpoints.join(","),
                config.etcd.prefix,
                report.present
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
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

/// `--tokens-file`, else `PROXMOXER_API_TOKENS_FILE`, else the configuration's
/// `api.tokens_file`.
fn tokens_file(arg: TokensFileArg, config_path: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    if let Some(path) = arg.tokens_file {
        return Ok(path);
    }
    let config = load_config(config_path)?;
    config.api_tokens_file.ok_or_else(|| {
        fail(
            "no API tokens file: pass --tokens-file PATH, set PROXMOXER_API_TOKENS_FILE, or set \
             api.tokens_file in the configuration given with --config",
        )
    })
}

fn token(command: TokenCommand, config_path: Option<PathBuf>) -> ExitCode {
    match command {
        TokenCommand::Add { name, role, file } => {
            let path = match tokens_file(file, config_path) {
                Ok(path) => path,
                Err(code) => return code,
            };
            let role = Role::from(role);
            match token_file::add(&path, &name, role) {
                Ok(secret) => {
                    eprintln!(
                        "added token {name} ({role}) to {}; its secret, shown only this once:",
                        path.display()
                    );
                    println!("{secret}");
                    eprintln!(
                        "a running daemon picks it up on SIGHUP (systemctl kill -s HUP proxmoxer)"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        TokenCommand::List { file } => {
            let path = match tokens_file(file, config_path) {
                Ok(path) => path,
                Err(code) => return code,
            };
            match TokenSet::load(&path) {
                Ok(tokens) => {
                    let width = tokens.entries().iter().map(|e| e.name.len()).max();
                    for entry in tokens.entries() {
                        let width = width.unwrap_or_default();
                        println!("{:<width$}  {}", entry.name, entry.role);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
        TokenCommand::Remove { name, file } => {
            let path = match tokens_file(file, config_path) {
                Ok(path) => path,
                Err(code) => return code,
            };
            match token_file::remove(&path, &name) {
                Ok(()) => {
                    eprintln!(
                        "removed token {name} from {}; a running daemon drops it on SIGHUP \
                         (systemctl kill -s HUP proxmoxer)",
                        path.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e.to_string()),
            }
        }
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

/// One message per SIGHUP (several before the first is handled count once). Installed before
/// the daemon starts, so a SIGHUP during start-up is not the default action: termination.
fn reload_requests() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    let (requests, received) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // Full means a reload is already pending; it will read the newest file.
            let _ = requests.try_send(());
        }
    });
    Ok(received)
}
