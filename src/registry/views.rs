//! What GET answers, rendered ahead of time: each cluster's JSON and history, kept by the
//! registry and re-rendered only when something in them changed, so a read is a pointer copy.
//!
//! Each representation carries a weak entity tag over everything but `last_checked_at`, which
//! moves on every check: watchers wake when the cluster changes, not every interval.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::cluster::{ClusterView, Transition};
use crate::domain::{ClusterId, ClusterStatus};

/// A weak entity tag (RFC 9110 §8.8.1): equal tags mean semantically the same representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Etag(pub u64);

impl Etag {
    /// The tag over a JSON value.
    pub fn of(value: &serde_json::Value) -> Self {
        let mut hasher = DefaultHasher::new();
        value.to_string().hash(&mut hasher);
        Self(hasher.finish())
    }

    /// Combines tags, e.g. those of a list's entries, in order.
    pub fn combine(tags: impl IntoIterator<Item = Etag>) -> Self {
        let mut hasher = DefaultHasher::new();
        for tag in tags {
            tag.0.hash(&mut hasher);
        }
        Self(hasher.finish())
    }

    /// The `ETag` header value, `W/"…"`.
    pub fn header(&self) -> String {
        format!("W/\"{:016x}\"", self.0)
    }
}

/// A representation ready to send.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The JSON body.
    pub body: Bytes,
    /// Its weak tag.
    pub etag: Etag,
}

/// One cluster's representation and a way to wait for the next change of it.
#[derive(Debug, Clone)]
pub struct ReadCluster {
    /// The current representation.
    pub rendered: Rendered,
    /// Sees the tag of every later representation; closed when the cluster is deleted.
    pub changes: watch::Receiver<Etag>,
}

/// One entry of the list: what filters and pages need, and the rendered object.
#[derive(Debug, Clone)]
pub struct ListEntry {
    /// The cluster's id.
    pub id: ClusterId,
    /// When it was registered (full precision), the list's order.
    pub created_at: DateTime<Utc>,
    /// Its name, for prefix filters.
    pub name: String,
    /// The status as shown (stale shows as unknown).
    pub status: ClusterStatus,
    /// The rendered Cluster object and its tag.
    pub rendered: Rendered,
}

/// Every cluster at one moment, newest first; immutable, so handlers filter and page it
/// outside the registry.
#[derive(Debug, Default)]
pub struct ListSnapshot {
    /// Newest first: `created_at` descending, then `id` descending.
    pub entries: Vec<ListEntry>,
    /// The tag over every entry's tag, in order.
    pub etag: Etag,
    /// The unfiltered body, rendered once on first use.
    full_body: std::sync::OnceLock<Bytes>,
}

impl ListSnapshot {
    fn new(entries: Vec<ListEntry>) -> Self {
        let etag = Etag::combine(entries.iter().map(|e| e.rendered.etag));
        Self {
            entries,
            etag,
            full_body: std::sync::OnceLock::new(),
        }
    }

    /// `{"clusters": [...], "total": N}` over the given entries, from their rendered bytes.
    pub fn render<'a>(entries: impl ExactSizeIterator<Item = &'a ListEntry>) -> Bytes {
        let total = entries.len();
        let mut body = Vec::with_capacity(64 + total * 512);
        body.extend_from_slice(b"{\"clusters\":[");
        for (index, entry) in entries.enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&entry.rendered.body);
        }
        body.extend_from_slice(format!("],\"total\":{total}}}").as_bytes());
        Bytes::from(body)
    }

    /// The whole list, the seed shape.
    pub fn full_body(&self) -> Bytes {
        self.full_body
            .get_or_init(|| Self::render(self.entries.iter()))
            .clone()
    }
}

/// The list and a way to wait for the next change of any cluster.
#[derive(Debug, Clone)]
pub struct ReadList {
    /// The current snapshot.
    pub snapshot: Arc<ListSnapshot>,
    /// Bumped whenever any cluster's tag changes, or one is added or removed.
    pub changes: watch::Receiver<u64>,
}

struct Entry {
    list: ListEntry,
    changes: watch::Sender<Etag>,
    history: Option<Rendered>,
}

/// The registry's rendered state. Every change goes through [`ReadModel::put_cluster`],
/// [`ReadModel::put_history`] or [`ReadModel::remove`].
pub struct ReadModel {
    entries: HashMap<ClusterId, Entry>,
    /// `(created_at, id)` → id, for the list order.
    order: BTreeMap<(DateTime<Utc>, ClusterId), ClusterId>,
    snapshot: Option<Arc<ListSnapshot>>,
    list_changes: watch::Sender<u64>,
}

impl Default for ReadModel {
    fn default() -> Self {
        Self::new()
    }
}

impl ReadModel {
    /// An empty model.
    pub fn new() -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            snapshot: None,
            list_changes: watch::channel(0).0,
        }
    }

    /// Renders a cluster's representation; wakes its watchers and the list's when the tag
    /// changed. `created_at` is the full-precision registration time (the view's is rounded).
    pub fn put_cluster(&mut self, view: &ClusterView, created_at: DateTime<Utc>) {
        let mut value = match serde_json::to_value(view) {
            Ok(value) => value,
            Err(e) => {
                tracing::error!(error = %e, "cannot render a cluster");
                return;
            }
        };
        let body = Bytes::from(value.to_string());
        if let Some(object) = value.as_object_mut() {
            object.remove("last_checked_at");
        }
        let rendered = Rendered {
            body,
            etag: Etag::of(&value),
        };
        let list = ListEntry {
            id: view.id,
            created_at,
            name: view.name.clone(),
            status: view.status,
            rendered: rendered.clone(),
        };
        let tag_changed = match self.entries.get_mut(&view.id) {
            Some(entry) => {
                let changed = entry.list.rendered.etag != rendered.etag;
                entry.list = list;
                if changed {
                    entry.changes.send_replace(rendered.etag);
                }
                changed
            }
            None => {
                self.order.insert((created_at, view.id), view.id);
                self.entries.insert(
                    view.id,
                    Entry {
                        list,
                        changes: watch::channel(rendered.etag).0,
                        history: None,
                    },
                );
                true
            }
        };
        // The body changed (`last_checked_at` at least): the next list read takes the new
        // bytes, but only a new tag wakes list watchers.
        self.snapshot = None;
        if tag_changed {
            self.list_changes.send_modify(|generation| *generation += 1);
        }
    }

    /// Renders a cluster's history, newest first.
    pub fn put_history(&mut self, id: ClusterId, newest_first: &[Transition]) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let value = serde_json::json!({
            "transitions": newest_first,
            "total": newest_first.len(),
        });
        entry.history = Some(Rendered {
            body: Bytes::from(value.to_string()),
            etag: Etag::of(&value),
        });
    }

    /// Forgets a deleted cluster; its watchers see the channel close.
    pub fn remove(&mut self, id: ClusterId) {
        if let Some(entry) = self.entries.remove(&id) {
            self.order.remove(&(entry.list.created_at, id));
            self.snapshot = None;
            self.list_changes.send_modify(|generation| *generation += 1);
        }
    }

    /// One cluster, if registered.
    pub fn cluster(&self, id: ClusterId) -> Option<ReadCluster> {
        self.entries.get(&id).map(|entry| ReadCluster {
            rendered: entry.list.rendered.clone(),
            changes: entry.changes.subscribe(),
        })
    }

    /// One cluster's history, if registered.
    pub fn history(&self, id: ClusterId) -> Option<Rendered> {
        self.entries
            .get(&id)
            .and_then(|entry| entry.history.clone())
    }

    /// The list; rebuilt only after a change.
    pub fn list(&mut self) -> ReadList {
        let snapshot = match &self.snapshot {
            Some(snapshot) => snapshot.clone(),
            None => {
                let entries = self
                    .order
                    .values()
                    .rev()
                    .filter_map(|id| self.entries.get(id))
                    .map(|entry| entry.list.clone())
                    .collect();
                let snapshot = Arc::new(ListSnapshot::new(entries));
                self.snapshot = Some(snapshot.clone());
                snapshot
            }
        };
        ReadList {
            snapshot,
            changes: self.list_changes.subscribe(),
        }
    }
}
