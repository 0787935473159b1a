//! The embedded redb backend: one file, one instance.
//!
//! redb is synchronous (`commit` fsyncs), so callers run these methods on a blocking thread.
//! Records are versioned JSON: a schema change is a new `format`, not a redb type mismatch.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use super::{CommitOutcome, StoreError, WriteBatch};
use crate::cluster::{ClusterRecord, Transition};
use crate::domain::ClusterId;
use crate::secrets::SealedSecret;

const CLUSTERS: TableDefinition<ClusterId, &[u8]> = TableDefinition::new("clusters_v1");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta_v1");
/// Before history rows: per cluster, its transitions as one JSON array, oldest first. Read
/// once to migrate, then dropped.
const HISTORY_V1: TableDefinition<ClusterId, &[u8]> = TableDefinition::new("history_v1");
/// One row per transition, keyed by cluster and a per-cluster sequence number, so recording a
/// transition costs one row, not a rewrite of the whole history.
const HISTORY: TableDefinition<(ClusterId, u64), &[u8]> = TableDefinition::new("history_v2");
/// Set to a file path, every commit first reads it: `stall <ms>` delays the commit, `fail`
/// fails it. Lets tests exercise a slow or failing disk from outside the process.
pub const FAULT_FILE_ENV: &str = "PROXMOXER_STORE_FAULT_FILE";
/// Written by [`RedbStore::probe`]; its value means nothing.
const WRITE_PROBE: &str = "write_probe";
/// A value sealed under the key, so a wrong key is caught at start, before any cluster is read.
const KEY_CHECK: &str = "key_check";

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

/// Moves histories stored as one array per cluster into rows.
fn migrate_history(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    tx.open_table(HISTORY)?;
    let old: Vec<(ClusterId, Vec<u8>)> = {
        let table = tx.open_table(HISTORY_V1)?;
        table
            .iter()?
            .map(|entry| entry.map(|(k, v)| (k.value(), v.value().to_vec())))
            .collect::<Result<_, _>>()?
    };
    if !old.is_empty() {
        let mut rows = tx.open_table(HISTORY)?;
        for (id, bytes) in old {
            let transitions: Vec<serde_json::Value> =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    id: format!("history of {id}"),
                    message: e.to_string(),
                })?;
            for (sequence, transition) in (0_u64..).zip(transitions) {
                rows.insert((id, sequence), transition.to_string().as_bytes())?;
            }
        }
    }
    tx.delete_table(HISTORY_V1)?;
    Ok(())
}

/// A handle to the redb database. Clones share it.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    fault_file: Option<PathBuf>,
}

impl RedbStore {
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
        migrate_history(&tx)?;
        tx.commit()?;
        Ok(Self {
            db: Arc::new(db),
            fault_file: std::env::var_os(FAULT_FILE_ENV).map(PathBuf::from),
        })
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
            if record.format != ClusterRecord::FORMAT {
                return Err(StoreError::Corrupt {
                    id: id.to_string(),
                    message: format!("unsupported record format {}", record.format),
                });
            }
            records.push(record);
        }
        Ok(records)
    }

    /// Every stored status history: per cluster, `(sequence, transition)` oldest first.
    pub fn load_histories(&self) -> Result<HashMap<ClusterId, Vec<(u64, Transition)>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(HISTORY)?;
        let mut histories: HashMap<ClusterId, Vec<(u64, Transition)>> = HashMap::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (id, sequence) = key.value();
            let transition: Transition =
                serde_json::from_slice(value.value()).map_err(|e| StoreError::Corrupt {
                    id: format!("history of {id}"),
                    message: e.to_string(),
                })?;
            histories
                .entry(id)
                .or_default()
                .push((sequence, transition));
        }
        Ok(histories)
    }

    /// Monitor results and durable writes in one transaction; when that fails, the durable
    /// writes get an attempt of their own, so whatever broke the monitor results does not
    /// fail registrations and deletions too.
    pub fn commit(&self, background: &WriteBatch, durable: &[WriteBatch]) -> CommitOutcome {
        let mut durable_batch = WriteBatch::default();
        for part in durable {
            durable_batch.merge(part.clone());
        }
        let mut combined = background.clone();
        combined.merge(durable_batch.clone());
        let result = self.apply(&combined);
        let (background_result, durable_result) = match result {
            Ok(()) => (Ok(()), Ok(())),
            Err(e) if !durable.is_empty() && !background.is_empty() => {
                (Err(e), self.apply(&durable_batch))
            }
            Err(e) => (Err(e.clone()), Err(e)),
        };
        CommitOutcome {
            background: background_result,
            durable: durable.iter().map(|_| durable_result.clone()).collect(),
        }
    }

    /// Applies a batch in one durable transaction: when this returns, it survives a crash.
    /// Upserts come first, then history rows, then trims, then deletions, so a deletion in
    /// the same batch wins.
    pub fn apply(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.injected_fault()?;
        let encode = |what: &str, e: serde_json::Error| {
            StoreError::Database(format!("cannot encode {what}: {e}"))
        };
        let tx = self.db.begin_write()?;
        {
            let mut records = tx.open_table(CLUSTERS)?;
            let mut history = tx.open_table(HISTORY)?;
            for record in batch.records.values() {
                let bytes = serde_json::to_vec(record).map_err(|e| encode("record", e))?;
                records.insert(record.id, bytes.as_slice())?;
            }
            for (id, sequence, transition) in &batch.history {
                let bytes = serde_json::to_vec(transition).map_err(|e| encode("history", e))?;
                history.insert((*id, *sequence), bytes.as_slice())?;
            }
            for (id, below) in &batch.trims {
                history.retain_in((*id, 0)..(*id, *below), |_, _| false)?;
            }
            for id in &batch.deletes {
                records.remove(*id)?;
                history.retain_in((*id, 0)..=(*id, u64::MAX), |_, _| false)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A write that changes nothing visible, to learn whether the disk takes writes again.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.injected_fault()?;
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(WRITE_PROBE, [].as_slice())?;
        tx.commit()?;
        Ok(())
    }

    fn injected_fault(&self) -> Result<(), StoreError> {
        let Some(path) = &self.fault_file else {
            return Ok(());
        };
        let instruction = std::fs::read_to_string(path).unwrap_or_default();
        let mut words = instruction.split_whitespace();
        match words.next() {
            Some("fail") => Err(StoreError::Database("injected write failure".into())),
            Some("stall") => {
                let millis = words.next().and_then(|m| m.parse().ok()).unwrap_or(0);
                std::thread::sleep(std::time::Duration::from_millis(millis));
                Ok(())
            }
            _ => Ok(()),
        }
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
