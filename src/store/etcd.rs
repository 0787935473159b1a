//! One registry in etcd, shared by several instances.
//!
//! Keys, under the configured prefix:
//! - `clusters/{id}`: the record as registrations and settings changes wrote it (any instance);
//! - `status/{id}`: the record as the leader's monitors last saw it, fenced by leadership;
//! - `names/{name}`: the id holding a name, so two instances cannot register one name twice;
//! - `history/{id}/{sequence}`: one status transition per key;
//! - `leader`: the leading instance's id, bound to its lease;
//! - `meta/key_check`, `meta/write_probe`.
//!
//! The store's methods block: they run on the writer's blocking thread (or at start-up) and
//! drive etcd's async client to completion on the runtime's handle.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::runtime::Handle;

use super::{CommitOutcome, Loaded, RemoteChange, StoreError, WriteBatch};
use crate::cluster::{ClusterRecord, Transition};
use crate::config::EtcdConfig;
use crate::domain::ClusterId;
use crate::secrets::SealedSecret;

/// etcd's default `--max-txn-ops` is 128; status writes are split below it.
const MAX_OPS_PER_TXN: usize = 100;
/// A request to an etcd that does not answer fails after this, so writes answer 503 soon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Loading a large registry is one response; tonic's default limit is 4 MiB.
const MAX_RESPONSE_BYTES: usize = 512 * 1024 * 1024;
/// How long a write is retried while etcd elects a leader.
const RETRY_BUDGET: Duration = Duration::from_secs(6);
/// A write that lost a race with another instance's write of the same cluster is retried.
const MAX_WRITE_ATTEMPTS: usize = 5;

/// A handle to the registry in etcd. Clones share the connection and the fence.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    runtime: Handle,
    /// While this instance leads: the revision that created the leader key, compared in every
    /// status write so a deposed leader's late writes are rejected.
    fence: Arc<Mutex<Option<i64>>>,
}

/// The key layout under one prefix.
#[derive(Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    fn cluster(&self, id: ClusterId) -> String {
        format!("{}/clusters/{id}", self.prefix)
    }
    fn clusters(&self) -> String {
        format!("{}/clusters/", self.prefix)
    }
    fn status(&self, id: ClusterId) -> String {
        format!("{}/status/{id}", self.prefix)
    }
    fn statuses(&self) -> String {
        format!("{}/status/", self.prefix)
    }
    fn name(&self, name: &str) -> String {
        format!("{}/names/{name}", self.prefix)
    }
    fn history(&self, id: ClusterId, sequence: u64) -> String {
        format!("{}/history/{id}/{sequence:020}", self.prefix)
    }
    fn history_of(&self, id: ClusterId) -> String {
        format!("{}/history/{id}/", self.prefix)
    }
    fn histories(&self) -> String {
        format!("{}/history/", self.prefix)
    }
    /// The leading instance's id, bound to its lease.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }
    fn key_check(&self) -> String {
        format!("{}/meta/key_check", self.prefix)
    }
    fn write_probe(&self) -> String {
        format!("{}/meta/write_probe", self.prefix)
    }
    /// Everything proxmoxer keeps, for the watch.
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        id: key.to_owned(),
        message: e.to_string(),
    }
}

fn encode<T: serde::Serialize>(what: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Database(format!("cannot encode {what}: {e}")))
}

fn decode_record(key: &str, value: &[u8]) -> Result<ClusterRecord, StoreError> {
    let record: ClusterRecord = serde_json::from_slice(value).map_err(|e| corrupt(key, e))?;
    if record.format != ClusterRecord::FORMAT {
        return Err(corrupt(
            key,
            format!("unsupported record format {}", record.format),
        ));
    }
    Ok(record)
}

/// `{id}/{sequence}` after the history prefix.
fn parse_history_key(rest: &str) -> Option<(ClusterId, u64)> {
    let (id, sequence) = rest.split_once('/')?;
    Some((id.parse().ok()?, sequence.parse().ok()?))
}

impl EtcdStore {
    /// Connects to etcd; fails when no endpoint answers within the connect timeout.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(user) = &config.username {
            let password = match &config.password_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| {
                        StoreError::Unavailable(format!(
                            "cannot read storage.etcd.password_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
                None => String::new(),
            };
            options = options.with_user(user, password);
        }
        if config.ca_file.is_some() || config.client_cert_file.is_some() {
            options = options.with_tls(tls_options(config)?);
        }
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        Ok(Self {
            client,
            keys: Keys {
                prefix: config.prefix.clone(),
            },
            runtime: Handle::current(),
            fence: Arc::new(Mutex::new(None)),
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A client sharing this store's connection.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Sets or clears the fence status writes are checked against.
    pub fn set_fence(&self, leader_revision: Option<i64>) {
        if let Ok(mut fence) = self.fence.lock() {
            *fence = leader_revision;
        }
    }

    fn fence(&self) -> Option<i64> {
        self.fence.lock().ok().and_then(|fence| *fence)
    }

    fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
    }

    fn block<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Every cluster and history at one revision, and that revision, from which the watch
    /// continues.
    pub async fn snapshot(&self) -> Result<Loaded, StoreError> {
        let keys = &self.keys;
        let response = self
            .kv()
            .txn(Txn::new().and_then([
                TxnOp::get(keys.clusters(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(keys.statuses(), Some(GetOptions::new().with_prefix())),
                TxnOp::get(keys.histories(), Some(GetOptions::new().with_prefix())),
            ]))
            .await
            .map_err(unavailable)?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(clusters), Some(statuses), Some(histories)) =
            (gets.next(), gets.next(), gets.next())
        else {
            return Err(StoreError::Unavailable(
                "etcd answered an incomplete snapshot".into(),
            ));
        };
        let mut records: BTreeMap<ClusterId, (ClusterRecord, i64)> = BTreeMap::new();
        for kv in clusters.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let record = decode_record(&key, kv.value())?;
            records.insert(record.id, (record, kv.mod_revision()));
        }
        for kv in statuses.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let status = decode_record(&key, kv.value())?;
            // A settings change written after the status carries the newer view.
            if let Some((record, revision)) = records.get_mut(&status.id)
                && kv.mod_revision() > *revision
            {
                record.adopt_status(&status);
            }
        }
        let mut loaded_histories: HashMap<ClusterId, Vec<(u64, Transition)>> = HashMap::new();
        let history_prefix = keys.histories();
        for kv in histories.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some((id, sequence)) = key
                .strip_prefix(&history_prefix)
                .and_then(parse_history_key)
            else {
                continue;
            };
            let transition: Transition =
                serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e))?;
            loaded_histories
                .entry(id)
                .or_default()
                .push((sequence, transition));
        }
        // Ids are v7 uuids: in id order is oldest first.
        Ok(Loaded {
            records: records.into_values().map(|(record, _)| record).collect(),
            histories: loaded_histories,
            revision: Some(revision),
        })
    }

    /// See [`super::Store::load`].
    pub fn load(&self) -> Result<Loaded, StoreError> {
        self.block(self.snapshot())
    }

    /// See [`super::Store::commit`].
    pub fn commit(&self, background: &WriteBatch, durable: &[WriteBatch]) -> CommitOutcome {
        self.block(async {
            // Concurrently: etcd commits what arrives together in one raft round.
            let mut writes = tokio::task::JoinSet::new();
            for (index, batch) in durable.iter().cloned().enumerate() {
                let store = self.clone();
                writes.spawn(async move { (index, store.write_durably_retrying(&batch).await) });
            }
            let mut outcomes: Vec<Result<(), StoreError>> = durable
                .iter()
                .map(|_| Err(StoreError::Unavailable("the write task failed".into())))
                .collect();
            while let Some(done) = writes.join_next().await {
                if let Ok((index, outcome)) = done
                    && let Some(slot) = outcomes.get_mut(index)
                {
                    *slot = outcome;
                }
            }
            let background = if background.is_empty() {
                Ok(())
            } else {
                retrying(|| self.write_status(background)).await
            };
            CommitOutcome {
                background,
                durable: outcomes,
            }
        })
    }

    /// A retry after a failed attempt may find the attempt's deletion done after all.
    async fn write_durably_retrying(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut attempted = false;
        retrying(|| {
            let retry = attempted;
            attempted = true;
            async move {
                match self.write_durably(batch).await {
                    Err(StoreError::Gone) if retry && !batch.deletes.is_empty() => Ok(()),
                    other => other,
                }
            }
        })
        .await
    }

    async fn write_durably(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        for id in &batch.deletes {
            self.delete(*id).await?;
        }
        for record in batch.records.values() {
            let history: Vec<(u64, &Transition)> = batch
                .history
                .iter()
                .filter(|(id, _, _)| *id == record.id)
                .map(|(_, sequence, t)| (*sequence, t))
                .collect();
            let trim = batch.trims.get(&record.id).copied();
            let creates = batch.creates.contains(&record.id);
            self.upsert(record, &history, trim, creates).await?;
        }
        Ok(())
    }

    /// Writes a cluster's settings record, guarding its name and, for an existing cluster,
    /// that nobody deleted it meanwhile. A new cluster takes one round trip: its transaction
    /// needs neither key to exist yet.
    async fn upsert(
        &self,
        record: &ClusterRecord,
        history: &[(u64, &Transition)],
        trim: Option<u64>,
        creates: bool,
    ) -> Result<(), StoreError> {
        let keys = &self.keys;
        let cluster_key = keys.cluster(record.id);
        let name_key = keys.name(record.name.as_str());
        let value = encode("record", record)?;
        let mut writes = vec![
            TxnOp::put(cluster_key.as_str(), value, None),
            TxnOp::put(name_key.as_str(), record.id.to_string(), None),
        ];
        for (sequence, transition) in history {
            writes.push(TxnOp::put(
                keys.history(record.id, *sequence),
                encode("history", transition)?,
                None,
            ));
        }
        if let Some(below) = trim {
            writes.push(TxnOp::delete(
                keys.history(record.id, 0),
                Some(DeleteOptions::new().with_range(keys.history(record.id, below))),
            ));
        }
        let mut kv = self.kv();
        if creates {
            let response = kv
                .txn(
                    Txn::new()
                        .when([
                            Compare::create_revision(cluster_key.as_str(), CompareOp::Equal, 0),
                            Compare::create_revision(name_key.as_str(), CompareOp::Equal, 0),
                        ])
                        .and_then(writes.clone()),
                )
                .await
                .map_err(unavailable)?;
            if response.succeeded() {
                return Ok(());
            }
            // The name is taken, or an earlier attempt of this very write landed: see below.
        }
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let current = kv
                .get(cluster_key.as_str(), None)
                .await
                .map_err(unavailable)?;
            let (revision, old_name) = match current.kvs().first() {
                Some(kv) => {
                    let old = decode_record(&cluster_key, kv.value())?;
                    (kv.mod_revision(), Some(old.name.as_str().to_owned()))
                }
                None if creates => (0, None),
                None => return Err(StoreError::Gone),
            };
            let mut compares = vec![Compare::mod_revision(
                cluster_key.as_str(),
                CompareOp::Equal,
                revision,
            )];
            let mut ops = writes.clone();
            if old_name.as_deref() != Some(record.name.as_str()) {
                compares.push(Compare::create_revision(
                    name_key.as_str(),
                    CompareOp::Equal,
                    0,
                ));
                if let Some(old) = &old_name {
                    ops.push(TxnOp::delete(keys.name(old), None));
                }
            }
            let response = kv
                .txn(Txn::new().when(compares).and_then(ops))
                .await
                .map_err(unavailable)?;
            if response.succeeded() {
                return Ok(());
            }
            let holder = kv.get(name_key.as_str(), None).await.map_err(unavailable)?;
            if holder
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() != record.id.to_string().as_bytes())
            {
                return Err(StoreError::NameTaken);
            }
        }
        Err(StoreError::Unavailable(
            "the cluster kept changing under concurrent writes; try again".into(),
        ))
    }

    async fn delete(&self, id: ClusterId) -> Result<(), StoreError> {
        let keys = &self.keys;
        let cluster_key = keys.cluster(id);
        let mut kv = self.kv();
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let current = kv
                .get(cluster_key.as_str(), None)
                .await
                .map_err(unavailable)?;
            let Some(existing) = current.kvs().first() else {
                return Err(StoreError::Gone);
            };
            let record = decode_record(&cluster_key, existing.value())?;
            let name_key = keys.name(record.name.as_str());
            let response = kv
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            cluster_key.as_str(),
                            CompareOp::Equal,
                            existing.mod_revision(),
                        )])
                        .and_then([
                            TxnOp::delete(cluster_key.as_str(), None),
                            TxnOp::delete(keys.status(id), None),
                            TxnOp::delete(
                                keys.history_of(id),
                                Some(DeleteOptions::new().with_prefix()),
                            ),
                            TxnOp::txn(
                                Txn::new()
                                    .when([Compare::value(
                                        name_key.as_str(),
                                        CompareOp::Equal,
                                        id.to_string(),
                                    )])
                                    .and_then([TxnOp::delete(name_key.as_str(), None)]),
                            ),
                        ]),
                )
                .await
                .map_err(unavailable)?;
            // Otherwise changed meanwhile (a settings change on another instance): delete that.
            if response.succeeded() {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(
            "the cluster kept changing under concurrent writes; try again".into(),
        ))
    }

    /// Monitor results, each transaction fenced by the leader key's creation revision.
    async fn write_status(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let Some(fence) = self.fence() else {
            return Err(StoreError::NotLeader);
        };
        let keys = &self.keys;
        let mut ops = Vec::new();
        for record in batch.records.values() {
            ops.push(TxnOp::put(
                keys.status(record.id),
                encode("status", record)?,
                None,
            ));
        }
        for (id, sequence, transition) in &batch.history {
            ops.push(TxnOp::put(
                keys.history(*id, *sequence),
                encode("history", transition)?,
                None,
            ));
        }
        for (id, below) in &batch.trims {
            ops.push(TxnOp::delete(
                keys.history(*id, 0),
                Some(DeleteOptions::new().with_range(keys.history(*id, *below))),
            ));
        }
        let mut kv = self.kv();
        let leader_key = keys.leader();
        while !ops.is_empty() {
            let chunk: Vec<TxnOp> = ops.drain(..ops.len().min(MAX_OPS_PER_TXN)).collect();
            let response = kv
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            leader_key.as_str(),
                            CompareOp::Equal,
                            fence,
                        )])
                        .and_then(chunk),
                )
                .await
                .map_err(unavailable)?;
            if !response.succeeded() {
                self.set_fence(None);
                return Err(StoreError::NotLeader);
            }
        }
        Ok(())
    }

    /// A write of its own, to learn whether etcd takes writes again.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.block(async {
            self.kv()
                .put(self.keys.write_probe(), "", None)
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    /// Whether etcd holds anything sealed under a key.
    pub fn holds_secrets(&self) -> Result<bool, StoreError> {
        self.block(async {
            let mut kv = self.kv();
            let check = kv
                .get(
                    self.keys.key_check(),
                    Some(GetOptions::new().with_count_only()),
                )
                .await
                .map_err(unavailable)?;
            let clusters = kv
                .get(
                    self.keys.clusters(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map_err(unavailable)?;
            Ok(check.count() > 0 || clusters.count() > 0)
        })
    }

    /// The stored key check, if any.
    pub fn key_check(&self) -> Result<Option<SealedSecret>, StoreError> {
        self.block(async {
            let key = self.keys.key_check();
            let response = self
                .kv()
                .get(key.as_str(), None)
                .await
                .map_err(unavailable)?;
            response
                .kvs()
                .first()
                .map(|kv| serde_json::from_slice(kv.value()).map_err(|e| corrupt(&key, e)))
                .transpose()
        })
    }

    /// Stores the key check unless another instance stored one first.
    pub fn set_key_check(&self, sealed: &SealedSecret) -> Result<(), StoreError> {
        let value = encode("key check", sealed)?;
        self.block(async {
            let key = self.keys.key_check();
            self.kv()
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.as_str(), value, None)]),
                )
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
    }

    /// Whether a cluster with this id is stored, and the id holding `name`, if any.
    pub async fn existing(
        &self,
        id: ClusterId,
        name: &str,
    ) -> Result<(bool, Option<String>), StoreError> {
        let mut kv = self.kv();
        let cluster = kv
            .get(
                self.keys.cluster(id),
                Some(GetOptions::new().with_count_only()),
            )
            .await
            .map_err(unavailable)?;
        let holder = kv
            .get(self.keys.name(name), None)
            .await
            .map_err(unavailable)?;
        let holder = holder
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        Ok((cluster.count() > 0, holder))
    }

    /// Writes a cluster copied from elsewhere (a redb registry): record and name, only if
    /// neither the id nor the name is stored yet, then its history in transactions below
    /// etcd's operation limit.
    pub async fn import(
        &self,
        record: &ClusterRecord,
        history: &[(u64, Transition)],
    ) -> Result<(), StoreError> {
        self.upsert(record, &[], None, true).await?;
        let mut rows = Vec::with_capacity(history.len());
        for (sequence, transition) in history {
            rows.push(TxnOp::put(
                self.keys.history(record.id, *sequence),
                encode("history", transition)?,
                None,
            ));
        }
        let mut kv = self.kv();
        while !rows.is_empty() {
            let chunk: Vec<TxnOp> = rows.drain(..rows.len().min(MAX_OPS_PER_TXN)).collect();
            kv.txn(Txn::new().and_then(chunk))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Follows every change after `revision`, handing each response's changes to `deliver`.
    /// Returns when the watch breaks (etcd gone, revision compacted); the caller reloads.
    pub async fn follow(
        &self,
        revision: i64,
        mut deliver: impl FnMut(Vec<RemoteChange>) -> bool,
    ) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let mut stream = client
            .watch(
                self.keys.all(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(unavailable)?;
        loop {
            let Some(response) = stream.message().await.map_err(unavailable)? else {
                return Err(StoreError::Unavailable("the etcd watch ended".into()));
            };
            if response.canceled() {
                return Err(StoreError::Unavailable(format!(
                    "the etcd watch was cancelled ({}), compacted at revision {}",
                    response.cancel_reason(),
                    response.compact_revision()
                )));
            }
            let mut changes = Vec::new();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if let Some(change) = self.decode_event(&key, event.event_type(), kv.value()) {
                    changes.push(change);
                }
            }
            if !changes.is_empty() && !deliver(changes) {
                return Ok(());
            }
        }
    }

    fn decode_event(&self, key: &str, kind: EventType, value: &[u8]) -> Option<RemoteChange> {
        let rest = key.strip_prefix(&self.keys.all())?;
        let decoded = |what: &str| match decode_record(key, value) {
            Ok(record) => Some(Box::new(record)),
            Err(e) => {
                tracing::error!(key, error = %e, "ignoring an unreadable {what} from etcd");
                None
            }
        };
        if let Some(id) = rest.strip_prefix("clusters/") {
            return match kind {
                EventType::Put => decoded("record").map(RemoteChange::Cluster),
                EventType::Delete => id.parse().ok().map(RemoteChange::Deleted),
            };
        }
        if rest.starts_with("status/") && kind == EventType::Put {
            return decoded("status").map(RemoteChange::Status);
        }
        if let Some(history) = rest.strip_prefix("history/")
            && kind == EventType::Put
        {
            let (id, sequence) = parse_history_key(history)?;
            let transition = serde_json::from_slice(value).ok()?;
            return Some(RemoteChange::History(id, sequence, transition));
        }
        None
    }
}

/// etcd answers "leader changed" or "no leader" while its members elect a new leader, which
/// takes about one election timeout: writes are retried that long before they fail. Every
/// write is guarded by a comparison, so repeating one that did land changes nothing.
async fn retrying<F, Fut>(mut attempt: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match attempt().await {
            Err(StoreError::Unavailable(why)) if started.elapsed() + delay < RETRY_BUDGET => {
                tracing::debug!(error = %why, "etcd write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

fn tls_options(config: &EtcdConfig) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |path: &std::path::Path, key: &str| {
        std::fs::read(path).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot read storage.etcd.{key} {}: {e}",
                path.display()
            ))
        })
    };
    let mut tls = etcd_client::TlsOptions::new();
    if let Some(ca) = &config.ca_file {
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca, "ca_file")?));
    }
    if let (Some(cert), Some(key)) = (&config.client_cert_file, &config.client_key_file) {
        tls = tls.identity(etcd_client::Identity::from_pem(
            read(cert, "client_cert_file")?,
            read(key, "client_key_file")?,
        ));
    }
    Ok(tls)
}
