//! Where the registry is stored. Only the registry writes, through its writer.
//!
//! - [`redb`]: the embedded default, one file for one instance.
//! - `etcd` (feature `etcd`): one registry shared by several instances, one of them leading.
//!
//! Backends are synchronous to their callers, who run them on a blocking thread: redb's
//! commit fsyncs, and etcd's calls are driven to completion there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::cluster::{ClusterRecord, Transition};
use crate::domain::ClusterId;
use crate::secrets::SealedSecret;

/// The etcd backend.
#[cfg(feature = "etcd")]
pub mod etcd;
/// The redb backend.
pub mod redb;

pub use self::redb::{FAULT_FILE_ENV, RedbStore};

/// Why the database could not be opened, read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database file.
    #[error(
        "database {0} is in use by another process (is another proxmoxer running?); nothing was changed"
    )]
    InUse(PathBuf),
    /// The file or its directory cannot be created or opened.
    #[error("cannot open database {path}: {message}")]
    Open { path: PathBuf, message: String },
    /// A transaction failed, e.g. the disk is full or failing.
    #[error("database error: {0}")]
    Database(String),
    /// A stored value does not decode.
    #[error("stored record {id} is unreadable: {message}")]
    Corrupt { id: String, message: String },
    /// Another cluster holds the name (seen by the shared store, not yet by this instance).
    #[error("a cluster with this name already exists")]
    NameTaken,
    /// The cluster was deleted (by another instance) before this change of it was stored.
    #[error("the cluster was deleted meanwhile")]
    Gone,
    /// The shared store cannot be reached; reads go on from memory.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A status write of an instance that is no longer the leader, rejected by its fence.
    #[error("no longer the leader: the status write was rejected")]
    NotLeader,
}

/// Changes to store in one transaction.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// Records to insert or replace, the newest per cluster.
    pub records: BTreeMap<ClusterId, ClusterRecord>,
    /// History rows to add: cluster, sequence number, transition.
    pub history: Vec<(ClusterId, u64, Transition)>,
    /// Per cluster, history rows with a sequence number below this are dropped (the cap).
    pub trims: BTreeMap<ClusterId, u64>,
    /// Clusters to delete with their history.
    pub deletes: Vec<ClusterId>,
    /// Clusters in `records` that are new: a shared store must not find them already there,
    /// and must not bring back any other record a deletion removed meanwhile.
    pub creates: Vec<ClusterId>,
}

impl WriteBatch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.history.is_empty()
            && self.trims.is_empty()
            && self.deletes.is_empty()
    }

    /// Adds `later` to this batch: its records replace older ones, its deletions drop what
    /// this batch held for those clusters.
    pub fn merge(&mut self, later: WriteBatch) {
        self.records.extend(later.records);
        self.history.extend(later.history);
        for (id, below) in later.trims {
            let trim = self.trims.entry(id).or_insert(below);
            *trim = (*trim).max(below);
        }
        self.creates.extend(later.creates);
        for id in later.deletes {
            self.records.remove(&id);
            self.history.retain(|(history_id, _, _)| *history_id != id);
            self.trims.remove(&id);
            self.deletes.push(id);
        }
    }
}

/// A change another instance (or this one) made, as the watch delivers it.
#[derive(Debug)]
pub enum RemoteChange {
    /// A cluster's settings record was written (registration or settings change).
    Cluster(Box<ClusterRecord>),
    /// The leader stored a cluster's status.
    Status(Box<ClusterRecord>),
    /// A cluster was deleted.
    Deleted(ClusterId),
    /// The leader stored a status transition.
    History(ClusterId, u64, Transition),
    /// A cluster's whole stored history, oldest first (in a full resynchronisation).
    Histories(ClusterId, Vec<(u64, Transition)>),
}

/// What the daemon starts with.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every stored cluster, oldest first.
    pub records: Vec<ClusterRecord>,
    /// Per cluster, `(sequence, transition)` oldest first.
    pub histories: HashMap<ClusterId, Vec<(u64, Transition)>>,
    /// A shared store's revision of this snapshot, from which changes are followed.
    pub revision: Option<i64>,
}

/// A handle to the registry's storage, whichever backend. Clones share it.
#[derive(Clone)]
pub enum Store {
    /// The embedded redb file.
    Redb(RedbStore),
    /// A shared etcd cluster.
    #[cfg(feature = "etcd")]
    Etcd(Box<etcd::EtcdStore>),
}

/// What one commit did: the background batch's outcome, and each durable batch's, in order.
#[derive(Debug)]
pub struct CommitOutcome {
    /// `Ok` when the background batch is stored (or there was none).
    pub background: Result<(), StoreError>,
    /// Per durable batch, in the order given.
    pub durable: Vec<Result<(), StoreError>>,
}

impl Store {
    /// Opens or creates a redb database (see [`RedbStore::open`]).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        RedbStore::open(path).map(Self::Redb)
    }

    /// Every stored cluster and history, as one snapshot.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        match self {
            Self::Redb(store) => Ok(Loaded {
                histories: store.load_histories()?,
                records: store.load_all()?,
                revision: None,
            }),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.load(),
        }
    }

    /// Every stored cluster, oldest first.
    pub fn load_all(&self) -> Result<Vec<ClusterRecord>, StoreError> {
        match self {
            Self::Redb(store) => store.load_all(),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.load().map(|loaded| loaded.records),
        }
    }

    /// Every stored status history: per cluster, `(sequence, transition)` oldest first.
    pub fn load_histories(&self) -> Result<HashMap<ClusterId, Vec<(u64, Transition)>>, StoreError> {
        match self {
            Self::Redb(store) => store.load_histories(),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.load().map(|loaded| loaded.histories),
        }
    }

    /// Stores monitor results (`background`) and registrations, changes and deletions
    /// (`durable`, each with an outcome of its own). With redb everything shares one
    /// transaction, and the durable batches get a second attempt of their own when the
    /// combined one fails; with etcd each durable batch is a transaction guarding its name, and
    /// the background batch is fenced by the leadership.
    pub fn commit(&self, background: &WriteBatch, durable: &[WriteBatch]) -> CommitOutcome {
        match self {
            Self::Redb(store) => store.commit(background, durable),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.commit(background, durable),
        }
    }

    /// A write that changes nothing visible, to learn whether the storage takes writes again.
    pub fn probe(&self) -> Result<(), StoreError> {
        match self {
            Self::Redb(store) => store.probe(),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.probe(),
        }
    }

    /// Whether the storage holds anything sealed under a key.
    pub fn holds_secrets(&self) -> Result<bool, StoreError> {
        match self {
            Self::Redb(store) => store.holds_secrets(),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.holds_secrets(),
        }
    }

    /// The value sealed under the key the stored credentials use, if one was stored.
    pub fn key_check(&self) -> Result<Option<SealedSecret>, StoreError> {
        match self {
            Self::Redb(store) => store.key_check(),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.key_check(),
        }
    }

    /// Stores the key check unless one is stored already; the stored one wins, so instances
    /// starting together with different keys cannot both succeed.
    pub fn set_key_check(&self, sealed: &SealedSecret) -> Result<(), StoreError> {
        match self {
            Self::Redb(store) => store.set_key_check(sealed),
            #[cfg(feature = "etcd")]
            Self::Etcd(store) => store.set_key_check(sealed),
        }
    }
}
