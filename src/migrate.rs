//! `proxmoxer migrate --from-redb PATH`: copies a redb registry into etcd.
//!
//! Clusters keep their ids, so running it twice copies nothing twice; a cluster of the same
//! name but another id already in etcd stops the copy, since one of the two would be lost.
//! Credentials are copied sealed: the etcd registry must use the same key.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::store::StoreError;

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The redb file does not exist (it is never created by a migration).
    #[error("no redb database at {0}")]
    NoDatabase(PathBuf),
    /// The etcd endpoints are not configured.
    #[error(
        "no etcd to copy into: set storage.etcd.endpoints (or PROXMOXER_STORAGE_ETCD_ENDPOINTS)"
    )]
    NoEtcd,
    /// The binary was built without the `etcd` feature.
    #[error(
        "this binary was built without etcd support; build it with `cargo build --release \
         --features etcd` (protoc is needed: apt install protobuf-compiler libprotobuf-dev)"
    )]
    NotBuilt,
    /// Reading redb or writing etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The key cannot be loaded, or does not open the credentials.
    #[error("{0}")]
    Key(String),
    /// etcd holds another cluster of this name; nothing after it was copied.
    #[error(
        "etcd already holds a different cluster named {name} (id {held_by}); {copied} cluster(s) \
         were copied before it, nothing after it"
    )]
    Namesake {
        /// The name both clusters have.
        name: String,
        /// The id of the cluster etcd holds.
        held_by: String,
        /// How many were copied before.
        copied: usize,
    },
}

/// What a migration did.
#[derive(Debug, Default)]
pub struct MigrateReport {
    /// Clusters written to etcd.
    pub copied: usize,
    /// Clusters etcd held already (an earlier run).
    pub present: usize,
}

/// Copies every cluster and its history from the redb file at `database` into the etcd
/// registry `config` names.
pub async fn from_redb(config: &Config, database: &Path) -> Result<MigrateReport, MigrateError> {
    if config.etcd.endpoints.is_empty() {
        return Err(MigrateError::NoEtcd);
    }
    if !database.is_file() {
        return Err(MigrateError::NoDatabase(database.to_owned()));
    }
    copy(config, database).await
}

#[cfg(not(feature = "etcd"))]
async fn copy(_config: &Config, _database: &Path) -> Result<MigrateReport, MigrateError> {
    Err(MigrateError::NotBuilt)
}

#[cfg(feature = "etcd")]
async fn copy(config: &Config, database: &Path) -> Result<MigrateReport, MigrateError> {
    use crate::store::{Store, etcd::EtcdStore};

    let source = {
        let database = database.to_owned();
        tokio::task::spawn_blocking(move || Store::open(&database))
            .await
            .map_err(|e| StoreError::Database(e.to_string()))??
    };
    let target = Store::Etcd(Box::new(EtcdStore::connect(&config.etcd).await?));
    let key_file = config.key_file.clone();
    let (loaded, etcd) = tokio::task::spawn_blocking(move || {
        // Both registries must open with this key: the source's credentials are copied
        // sealed, and the target's instances will open them with it.
        crate::unlock_vault(&source, &key_file)
            .map_err(|e| MigrateError::Key(format!("the redb registry: {e}")))?;
        crate::unlock_vault(&target, &key_file)
            .map_err(|e| MigrateError::Key(format!("the etcd registry: {e}")))?;
        Ok::<_, MigrateError>((source.load()?, target))
    })
    .await
    .map_err(|e| StoreError::Database(e.to_string()))??;
    let Store::Etcd(etcd) = etcd else {
        return Err(MigrateError::NoEtcd);
    };
    let mut report = MigrateReport::default();
    let mut histories = loaded.histories;
    for record in loaded.records {
        let (exists, holder) = etcd.existing(record.id, record.name.as_str()).await?;
        if exists {
            report.present += 1;
            continue;
        }
        if let Some(held_by) = holder.filter(|holder| *holder != record.id.to_string()) {
            return Err(MigrateError::Namesake {
                name: record.name.to_string(),
                held_by,
                copied: report.copied,
            });
        }
        let history = histories.remove(&record.id).unwrap_or_default();
        match etcd.import(&record, &history).await {
            Ok(()) => report.copied += 1,
            Err(StoreError::NameTaken) => {
                return Err(MigrateError::Namesake {
                    name: record.name.to_string(),
                    held_by: "another instance's new registration".into(),
                    copied: report.copied,
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(report)
}
