//! proxmoxer keeps a registry of Proxmox VE clusters and watches their health.
//!
//! # Layout
//! - [`config`]: embedded defaults, TOML file and `PROXMOXER_*` environment, validated once.
//! - [`domain`]: validated values (names, endpoints, users, secrets, statuses).
//! - [`api`]: the axum REST API; handlers only message the registry.
//! - [`registry`]: the registry actor, sole owner of cluster state and sole store writer;
//!   it spawns and supervises the monitors.
//! - [`monitor`]: one actor per cluster that checks Proxmox on a period.
//! - [`cluster`]: a registered cluster, the status rules and its status history.
//! - [`events`]: the change feed behind `GET /api/v1/events`.
//! - [`metrics`]: Prometheus exposition.
//! - [`proxmox`]: the typed Proxmox VE API client.
//! - [`store`]: the redb cluster table.
//! - [`secrets`]: the AEAD envelope and key file for stored credentials.
//! - [`tls`]: certificate trust for Proxmox: fingerprint pins, CA files.
//! - [`systemd`]: readiness, status line and watchdog.
//! - [`limits`]: the open-files limit, shared between API connections and monitors.
//! - [`cli`]: the terminal commands `status` and `watch`, clients of a running daemon's API.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod proxmox;
pub mod registry;
pub mod secrets;
pub mod store;
pub mod systemd;
pub mod tls;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ractor::Actor;
use tokio::net::TcpListener;

use crate::cluster::Cluster;
use crate::config::Config;
use crate::domain::Secret;
use crate::monitor::MonitorSettings;
use crate::proxmox::members::MemberPolicy;
use crate::registry::{RegistryActor, RegistryArgs, RegistrySettings};
use crate::secrets::{SecretsError, Vault};
use crate::store::{Store, StoreError};
use crate::tls::{TlsError, TrustAnchors};

/// A known plaintext sealed under the key, to recognise the right key at start.
const KEY_CHECK_PLAINTEXT: &str = "proxmoxer key check";
const KEY_CHECK_CONTEXT: &[u8] = b"key-check";
/// pveproxy delays every 401 by 3 s; a shorter timeout turns them into timeouts.
const MIN_SENSIBLE_PROXMOX_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The API tokens file is missing or malformed, or the API would be open to the network.
    #[error(transparent)]
    Access(#[from] api::auth::AccessError),
    #[error(
        "the database holds encrypted credentials but the key file {0} is missing; restore the key \
         (a new key cannot decrypt them, so none is generated)"
    )]
    KeyMissing(PathBuf),
    #[error(
        "the key file {0} does not match the key the database's credentials were encrypted with"
    )]
    KeyMismatch(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the registry: {0}")]
    Registry(String),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Completes on SIGINT or SIGTERM. The handlers are installed when this is called, not when
/// the future is first polled, so a signal during start-up is not lost.
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
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

/// Runs the daemon until `shutdown` completes, then drains in-flight requests (bounded by
/// `shutdown_grace`), stops the monitors and persists the latest state. Each message on
/// `reloads` re-reads the API tokens file.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    mut reloads: tokio::sync::mpsc::Receiver<()>,
) -> Result<(), StartupError> {
    let open_files = limits::raise_open_files_limit();
    // A bad CA file is a configuration error: report it before creating a database or key.
    let trust = TrustAnchors::load(
        config.tls_ca_file.as_deref(),
        config.tls_insecure_skip_verify,
    )?;
    // Before anything is created or bound: a typo in the tokens file must not open the API.
    let keyring = Arc::new(api::auth::Keyring::load(
        config.api_tokens_file.as_deref(),
        config.listen,
        config.api_allow_unauthenticated,
    )?);
    let (store, vault, clusters) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_state(&config.database, &config.key_file))
            .await
            .map_err(|e| StartupError::Registry(e.to_string()))??
    };
    tracing::info!(
        database = %config.database.display(),
        clusters = clusters.len(),
        "database opened"
    );
    let budget = limits::FileBudget::new(open_files, config.max_connections);
    budget.log(config.max_connections, clusters.len());

    if config.proxmox_timeout < MIN_SENSIBLE_PROXMOX_TIMEOUT {
        tracing::warn!(
            timeout = %humantime::format_duration(config.proxmox_timeout),
            "proxmox.timeout is below 5s: Proxmox answers authentication failures 3 s late, so \
             a rejected ticket or password may be reported as a timeout"
        );
    }
    let settings = RegistrySettings {
        monitor: MonitorSettings {
            interval: config.monitor_interval,
            proxmox_timeout: config.proxmox_timeout,
            members: MemberPolicy {
                discovery: config.member_discovery,
                networks: config.member_networks.clone().into(),
            },
        },
        failure_threshold: config.failure_threshold,
    };
    let (registry, registry_task) = Actor::spawn(
        None,
        RegistryActor,
        RegistryArgs {
            store,
            vault: Arc::new(vault),
            clusters,
            settings,
            trust,
        },
    )
    .await
    .map_err(|e| StartupError::Registry(e.to_string()))?;

    let listener = match TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(source) => {
            registry.stop(None);
            let _ = registry_task.await;
            return Err(StartupError::Bind {
                addr: config.listen,
                source,
            });
        }
    };
    let addr = listener.local_addr().map_err(StartupError::Serve)?;
    keyring.log_state();
    tracing::info!("listening on http://{addr}");
    {
        let keyring = Arc::clone(&keyring);
        tokio::spawn(async move {
            while reloads.recv().await.is_some() {
                keyring.reload_and_log();
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = api::router(api::AppState {
        registry: registry.clone(),
        shutdown: stop_rx.clone(),
        metrics: metrics::Metrics::install(),
        keyring,
    });
    tokio::spawn(async move {
        shutdown.await;
        systemd::stopping();
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    match ractor::call_t!(registry, registry::RegistryMsg::Snapshot, 5_000) {
        Ok(snapshot) => systemd::ready(&snapshot),
        Err(e) => return Err(StartupError::Registry(e.to_string())),
    }
    systemd::spawn_supervision(registry.clone(), stop_rx.clone());
    let serve = api::listener::serve(
        api::listener::ApiListener::new(listener),
        app,
        api::listener::ConnectionLimits {
            max_connections: budget.api_connections,
            header_timeout: config.header_timeout,
            request_timeout: config.request_timeout,
        },
        stop_rx.clone(),
    );
    let mut deadline_rx = stop_rx;
    let grace = config.shutdown_grace;
    // Graceful shutdown waits for every connection, even one stuck mid-headers: bound it.
    let deadline = async move {
        let _ = deadline_rx.wait_for(|stop| *stop).await;
        tokio::time::sleep(grace).await;
    };
    let mut registry_task = registry_task;
    let served = tokio::select! {
        () = serve => Ok(()),
        () = deadline => {
            tracing::warn!("shutdown grace period over; closing remaining connections");
            Ok(())
        }
        // Without its registry the daemon can only answer 503: exit, so the service manager
        // restarts it.
        _ = &mut registry_task => {
            return Err(StartupError::Registry("the registry stopped unexpectedly".into()));
        }
    };

    registry.stop(None);
    let _ = registry_task.await;
    tracing::info!("stopped");
    served
}

/// Opens the store, unlocks the key and decrypts every stored credential, failing before
/// anything is served if any of that is wrong.
fn open_state(
    database: &Path,
    key_file: &Path,
) -> Result<(Store, Vault, Vec<Cluster>), StartupError> {
    let store = Store::open(database)?;
    let vault = unlock_vault(&store, key_file)?;
    let mut histories = store.load_histories()?;
    let clusters = store
        .load_all()?
        .into_iter()
        .map(|record| {
            let secret = vault.open(&record.credential, record.id.as_bytes())?;
            let credentials = record
                .credentials(secret)
                .ok_or_else(|| StoreError::Corrupt {
                    id: record.id.to_string(),
                    message: "token credentials without a token id".into(),
                })?;
            let history = histories.remove(&record.id).unwrap_or_default();
            Ok(Cluster::loaded(record, credentials, history))
        })
        .collect::<Result<Vec<_>, StartupError>>()?;
    Ok((store, vault, clusters))
}

/// Loads the key, or creates one for a database that holds no secret yet. Never makes a new
/// key over existing secrets: they would be lost.
fn unlock_vault(store: &Store, key_file: &Path) -> Result<Vault, StartupError> {
    let vault = match Vault::load(key_file)? {
        Some(vault) => vault,
        None if store.holds_secrets()? => {
            return Err(StartupError::KeyMissing(key_file.to_owned()));
        }
        None => {
            tracing::info!(key_file = %key_file.display(), "generating a new credential key");
            Vault::create(key_file)?
        }
    };
    match store.key_check()? {
        Some(sealed) => match vault.open(&sealed, KEY_CHECK_CONTEXT) {
            Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT => {}
            _ => return Err(StartupError::KeyMismatch(key_file.to_owned())),
        },
        None => {
            let sealed = vault.seal(&Secret::new(KEY_CHECK_PLAINTEXT), KEY_CHECK_CONTEXT)?;
            store.set_key_check(&sealed)?;
        }
    }
    Ok(vault)
}
