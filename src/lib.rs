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
//! - [`store`]: where the registry is stored: redb, or etcd shared by several instances.
//! - [`secrets`]: the AEAD envelope and key file for stored credentials.
//! - [`tls`]: certificate trust for Proxmox: fingerprint pins, CA files.
//! - [`systemd`]: readiness, status line and watchdog.
//! - [`limits`]: the open-files limit, shared between API connections and monitors.
//! - [`leadership`]: which instance runs the monitors; the etcd election.
//! - [`migrate`]: copying a redb registry into etcd.
//! - [`cli`]: the terminal commands `status` and `watch`, clients of a running daemon's API.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod events;
pub mod leadership;
pub mod limits;
pub mod metrics;
pub mod migrate;
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
use crate::config::{Config, StorageBackend};
use crate::domain::Secret;
use crate::leadership::Leadership;
use crate::monitor::MonitorSettings;
use crate::proxmox::ProxmoxRuntime;
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
    /// The storage cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key file cannot be read or created, or a credential does not open.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// The CA file is unreadable or holds no certificate.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The API tokens file is missing or malformed, or the API would be open to the network.
    #[error(transparent)]
    Access(#[from] api::auth::AccessError),
    /// Stored credentials exist but their key does not.
    #[error(
        "the database holds encrypted credentials but the key file {0} is missing; restore the key \
         (a new key cannot decrypt them, so none is generated)"
    )]
    KeyMissing(PathBuf),
    /// The key does not open the stored key check: another installation's key.
    #[error("the key file {0} does not match the key the stored credentials were encrypted with")]
    KeyMismatch(PathBuf),
    /// The API's address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The registry actor did not start or stopped.
    #[error("cannot start the registry: {0}")]
    Registry(String),
    /// The thread that talks to Proxmox cannot be started.
    #[error("cannot start the Proxmox thread: {0}")]
    ProxmoxThread(std::io::Error),
    /// `storage.backend = "etcd"` in a binary built without the `etcd` feature.
    #[error(
        "storage.backend is etcd, but this binary was built without etcd support; build it with \
         `cargo build --release --features etcd` (protoc is needed: apt install protobuf-compiler \
         libprotobuf-dev)"
    )]
    EtcdNotBuilt,
    /// The API server failed.
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
    let store = open_store(&config).await?;
    let (vault, clusters, revision) = {
        let store = store.clone();
        let key_file = config.key_file.clone();
        tokio::task::spawn_blocking(move || open_state(&store, &key_file))
            .await
            .map_err(|e| StartupError::Registry(e.to_string()))??
    };
    match config.backend {
        StorageBackend::Redb => tracing::info!(
            database = %config.database.display(),
            clusters = clusters.len(),
            "database opened"
        ),
        StorageBackend::Etcd => tracing::info!(
            endpoints = %config.etcd.endpoints.join(","),
            prefix = %config.etcd.prefix,
            clusters = clusters.len(),
            instance = %leadership::instance_id(),
            "registry loaded from etcd"
        ),
    }
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
        flush_interval: match config.backend {
            StorageBackend::Redb => registry::FLUSH_INTERVAL,
            StorageBackend::Etcd => registry::SHARED_FLUSH_INTERVAL,
        },
    };
    // Held until `run` returns, after the registry has stopped its monitors.
    let (proxmox, _proxmox_thread) =
        ProxmoxRuntime::start().map_err(StartupError::ProxmoxThread)?;
    let (registry, registry_task) = Actor::spawn(
        None,
        RegistryActor,
        RegistryArgs {
            store: store.clone(),
            vault: Arc::new(vault),
            clusters,
            settings,
            trust,
            proxmox,
            leadership: match config.backend {
                StorageBackend::Redb => Leadership::standalone(),
                StorageBackend::Etcd => Leadership::undecided(),
            },
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
    share_the_store(&store, revision, &config, &registry, &stop_rx);
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
        Ok(snapshot) => systemd::ready(&snapshot.figures()),
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

/// Opens redb, or connects to etcd.
async fn open_store(config: &Config) -> Result<Store, StartupError> {
    match config.backend {
        StorageBackend::Redb => {
            let database = config.database.clone();
            tokio::task::spawn_blocking(move || Store::open(&database))
                .await
                .map_err(|e| StartupError::Registry(e.to_string()))?
                .map_err(StartupError::from)
        }
        #[cfg(feature = "etcd")]
        StorageBackend::Etcd => Ok(Store::Etcd(Box::new(
            store::etcd::EtcdStore::connect(&config.etcd).await?,
        ))),
        #[cfg(not(feature = "etcd"))]
        StorageBackend::Etcd => Err(StartupError::EtcdNotBuilt),
    }
}

/// With etcd: runs the election and follows other instances' changes until shutdown.
fn share_the_store(
    store: &Store,
    revision: Option<i64>,
    config: &Config,
    registry: &ractor::ActorRef<registry::RegistryMsg>,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    match store {
        Store::Redb(_) => {
            let _ = (revision, config, registry, stop);
        }
        #[cfg(feature = "etcd")]
        Store::Etcd(etcd) => {
            tokio::spawn(leadership::election::run(
                (**etcd).clone(),
                leadership::instance_id(),
                config.etcd.lease_ttl,
                registry.clone(),
                stop.clone(),
            ));
            tokio::spawn(registry::replication::follow(
                (**etcd).clone(),
                revision.unwrap_or(0),
                registry.clone(),
                stop.clone(),
            ));
        }
    }
}

/// Unlocks the key and decrypts every stored credential, failing before anything is served
/// if any of that is wrong. Clusters in a shared store start as stored: the leader's
/// monitors, not this start, decide their status.
fn open_state(
    store: &Store,
    key_file: &Path,
) -> Result<(Vault, Vec<Cluster>, Option<i64>), StartupError> {
    let vault = unlock_vault(store, key_file)?;
    let loaded = store.load()?;
    let shared = loaded.revision.is_some();
    let mut histories = loaded.histories;
    let clusters = loaded
        .records
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
            Ok(if shared {
                Cluster::mirrored(record, credentials, history)
            } else {
                Cluster::loaded(record, credentials, history)
            })
        })
        .collect::<Result<Vec<_>, StartupError>>()?;
    Ok((vault, clusters, loaded.revision))
}

/// Loads the key, or creates one for a database that holds no secret yet. Never makes a new
/// key over existing secrets: they would be lost.
pub(crate) fn unlock_vault(store: &Store, key_file: &Path) -> Result<Vault, StartupError> {
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
    let stored = match store.key_check()? {
        Some(sealed) => sealed,
        None => {
            let sealed = vault.seal(&Secret::new(KEY_CHECK_PLAINTEXT), KEY_CHECK_CONTEXT)?;
            store.set_key_check(&sealed)?;
            // With a shared store, another instance may have stored its own first: that wins.
            store.key_check()?.unwrap_or(sealed)
        }
    };
    match vault.open(&stored, KEY_CHECK_CONTEXT) {
        Ok(plain) if plain.expose() == KEY_CHECK_PLAINTEXT => Ok(vault),
        _ => Err(StartupError::KeyMismatch(key_file.to_owned())),
    }
}
