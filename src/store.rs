//! The redb-backed cluster table. Only the registry writes to it.
//!
//! redb is synchronous (`commit` fsyncs), so callers run these methods on a blocking thread.
//! Records are versioned JSON: a schema change is a new `format`, not a redb type mismatch.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use crate::cluster::Transition;
use crate::domain::{
    AuthMethod, ClusterId, ClusterName, ClusterStatus, Credentials, Endpoint, ProxmoxUser, Secret,
    StatusReason, TokenId,
};
use crate::proxmox::members::Member;
use crate::secrets::SealedSecret;
use crate::tls::Fingerprint;

const CLUSTERS: TableDefinition<ClusterId, &[u8]> = TableDefinition::new("clusters_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
/// Per cluster, its recent status transitions as one JSON array, oldest first.
const HISTORY: TableDefinition<ClusterId, &[u8]> = TableDefinition::new("history_v1");
/// A value sealed under the key, so a wrong key is caught at start, before any cluster is read.
const KEY_CHECK: &str = "key_check";
const RECORD_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database {0} is in use by another process (is another proxmoxer running?); nothing was changed"
    )]
    InUse(PathBuf),
    #[error("cannot open database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("database error: {0}")]
    Database(String),
    #[error("stored record {id} is unreadable: {message}")]
    Corrupt { id: String, message: String },
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A cluster as it is persisted. The credential is only ever stored sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub format: u32,
    pub id: ClusterId,
    pub name: ClusterName,
    pub api_endpoint: Endpoint,
    pub username: ProxmoxUser,
    #[serde(default)]
    pub auth_method: AuthMethod,
    #[serde(default)]
    pub token_id: Option<TokenId>,
    /// The password or token secret, sealed under the key with the id as context.
    pub credential: SealedSecret,
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    pub proxmox_version: String,
    pub node_count: u32,
    pub nodes_online: u32,
    pub quorate: Option<bool>,
    pub status: ClusterStatus,
    pub status_reason: StatusReason,
    pub last_error: Option<String>,
    pub last_checked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Every known member with its pin, so failover works after a restart.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The endpoint that answered the newest check.
    #[serde(default)]
    pub active_endpoint: Option<Endpoint>,
}

impl ClusterRecord {
    pub const FORMAT: u32 = RECORD_FORMAT;

    /// The credentials, given the opened secret.
    pub fn credentials(&self, secret: Secret) -> Result<Credentials, StoreError> {
        match (self.auth_method, &self.token_id) {
            (AuthMethod::Password, _) => Ok(Credentials::Password {
                username: self.username.clone(),
                password: secret,
            }),
            (AuthMethod::Token, Some(token_id)) => Ok(Credentials::Token {
                username: self.username.clone(),
                token_id: token_id.clone(),
                secret,
            }),
            (AuthMethod::Token, None) => Err(StoreError::Corrupt {
                id: self.id.to_string(),
                message: "token credentials without a token id".into(),
            }),
        }
    }
}

/// A handle to the database. Clones share it.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens or creates the database with mode 0600. Fails fast, touching nothing, when another
    /// process holds it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: path.to_owned(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        // Create the file ourselves so it is private from the first byte; redb initialises an
        // empty file as a new database, and never truncates an existing one.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        let is_new = file.metadata().map(|m| m.len() == 0).unwrap_or(false);
        if is_new {
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(|e| open_err(e.to_string()))?;
        }
        drop(file);
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.to_owned()),
            other => open_err(other.to_string()),
        })?;
        let tx = db.begin_write()?;
        tx.open_table(CLUSTERS)?;
        tx.open_table(META)?;
        tx.open_table(HISTORY)?;
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Every stored cluster, oldest first.
    pub fn load_all(&self) -> Result<Vec<ClusterRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(CLUSTERS)?;
        let mut records = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let id = key.value();
            let record: ClusterRecord =
                serde_json::from_slice(value.value()).map_err(|e| StoreError::Corrupt {
                    id: id.to_string(),
                    message: e.to_string(),
                })?;
            if record.format != RECORD_FORMAT {
                return Err(StoreError::Corrupt {
                    id: id.to_string(),
                    message: format!("unsupported record format {}", record.format),
                });
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Every stored status history.
    pub fn load_histories(&self) -> Result<HashMap<ClusterId, Vec<Transition>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(HISTORY)?;
        let mut histories = HashMap::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let id = key.value();
            let history: Vec<Transition> =
                serde_json::from_slice(value.value()).map_err(|e| StoreError::Corrupt {
                    id: format!("history of {id}"),
                    message: e.to_string(),
                })?;
            histories.insert(id, history);
        }
        Ok(histories)
    }

    /// Writes records, and the histories given with them, in one durable transaction: when
    /// this returns, they survive a crash. A history is rewritten only when it changed.
    pub fn put(
        &self,
        clusters: &[(ClusterRecord, Option<Vec<Transition>>)],
    ) -> Result<(), StoreError> {
        let encode = |what: &str, e: serde_json::Error| {
            StoreError::Database(format!("cannot encode {what}: {e}"))
        };
        let tx = self.db.begin_write()?;
        {
            let mut records = tx.open_table(CLUSTERS)?;
            let mut histories = tx.open_table(HISTORY)?;
            for (record, history) in clusters {
                let bytes = serde_json::to_vec(record).map_err(|e| encode("record", e))?;
                records.insert(record.id, bytes.as_slice())?;
                if let Some(history) = history {
                    let bytes = serde_json::to_vec(history).map_err(|e| encode("history", e))?;
                    histories.insert(record.id, bytes.as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes a cluster and its history durably. Returns whether it existed.
    pub fn delete(&self, id: ClusterId) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let existed = {
            let mut table = tx.open_table(CLUSTERS)?;
            tx.open_table(HISTORY)?.remove(id)?;
            table.remove(id)?.is_some()
        };
        tx.commit()?;
        Ok(existed)
    }

    /// Whether the database holds anything sealed under a key.
    pub fn holds_secrets(&self) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        let has_check = tx.open_table(META)?.get(KEY_CHECK)?.is_some();
        let has_clusters = !tx.open_table(CLUSTERS)?.is_empty()?;
        Ok(has_check || has_clusters)
    }

    pub fn key_check(&self) -> Result<Option<SealedSecret>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(META)?;
        let Some(value) = table.get(KEY_CHECK)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                id: KEY_CHECK.to_owned(),
                message: e.to_string(),
            })
    }

    pub fn set_key_check(&self, sealed: &SealedSecret) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(sealed)
            .map_err(|e| StoreError::Database(format!("cannot encode key check: {e}")))?;
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(KEY_CHECK, bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }
}
