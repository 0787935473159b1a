//! What GET answers, rendered ahead of time: each cluster's JSON and history, kept by the
//! registry and re-rendered only when something in them changed, so a read is a pointer copy.
//!
//! Each representation carries a weak entity tag over everything but `last_checked_at`, which
//! moves on every check: watchers wake when the cluster changes, not every interval.
//!
//! The list is an immutable [`ListSnapshot`] shared by every reader. A change of any tag (a
//! status, a member, a registration or deletion) drops it, so the next read sees it at once. A
//! change of bodies alone (`last_checked_at`, which every check moves) keeps it for up to
//! [`LIST_BODY_REFRESH`]: otherwise, with thousands of clusters, every list read after any
//! check would rebuild the snapshot and re-render megabytes. Filters and pages are cut from a
//! snapshot by the handler ([`ListSnapshot::query`]), outside the registry.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::{Bound, Range};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use super::ClusterSnapshot;
use crate::cluster::{ClusterView, Transition};
use crate::domain::{ClusterId, ClusterStatus};

/// How long the list may show bodies older than the clusters' own (only `last_checked_at`
/// differs then: any other change drops the snapshot at once). `last_checked_at` is shown to
/// the second, so a second of lag is within its precision.
pub const LIST_BODY_REFRESH: Duration = Duration::from_secs(1);

/// The member of a cluster's JSON that its tag leaves out.
const UNTAGGED_MEMBER: &str = "last_checked_at";

/// A weak entity tag (RFC 9110 §8.8.1): equal tags mean semantically the same representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Etag(pub u64);

impl Etag {
    /// The tag over a JSON value.
    pub fn of(value: &serde_json::Value) -> Self {
        Self::of_bytes(value.to_string().as_bytes())
    }

    /// The tag over rendered bytes.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let mut hasher = DefaultHasher::new();
        hasher.write(bytes);
        Self(hasher.finish())
    }

    /// The tag over a rendered JSON object, leaving out the value of its top-level member
    /// `key` (which must be a scalar or a string): two objects that differ only there share a
    /// tag. Without such a member, the tag is over all of it.
    fn of_object_except(json: &[u8], key: &str) -> Self {
        let Some(skip) = top_level_value(json, key) else {
            return Self::of_bytes(json);
        };
        let mut hasher = DefaultHasher::new();
        hasher.write(&json[..skip.start]);
        hasher.write(&json[skip.end..]);
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

    /// The tag one entity tag of an `If-None-Match` names, compared weakly: `W/` is ignored
    /// (RFC 9110 §8.8.3.2), and so are missing quotes, which hand-written requests often drop.
    /// `None` for anything this server never issued, which then matches no tag.
    pub fn parse(tag: &str) -> Option<Self> {
        let tag = tag.trim();
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        let opaque = tag
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(tag);
        if opaque.len() != 16 || !opaque.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(opaque, 16).ok().map(Self)
    }
}

/// Where the value of the top-level member `key` of a compact JSON object lies, found with a
/// scan that knows strings and nesting: a nested member of that name, or a string holding it,
/// is not it.
fn top_level_value(json: &[u8], key: &str) -> Option<Range<usize>> {
    let mut depth = 0usize;
    let mut at = 0;
    while at < json.len() {
        match json[at] {
            b'"' => {
                let end = string_end(json, at)?;
                let is_key = depth == 1 && json.get(end) == Some(&b':');
                if is_key && &json[at + 1..end - 1] == key.as_bytes() {
                    let start = end + 1;
                    return Some(start..value_end(json, start)?);
                }
                at = end;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            _ => {}
        }
        at += 1;
    }
    None
}

/// The index just past the string that opens at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut at = start + 1;
    while at < json.len() {
        match json[at] {
            b'\\' => at += 2,
            b'"' => return Some(at + 1),
            _ => at += 1,
        }
    }
    None
}

/// The index just past the value that starts at `start`: the next `,` or closing bracket at
/// its own level.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut at = start;
    while at < json.len() {
        match json[at] {
            b'"' => {
                at = string_end(json, at)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth == 0 => return Some(at),
            b'}' | b']' => depth -= 1,
            b',' if depth == 0 => return Some(at),
            _ => {}
        }
        at += 1;
    }
    None
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
    /// The status as shown (stale shows as unknown).
    pub status: ClusterStatus,
    /// The rendered Cluster object and its tag.
    pub rendered: Rendered,
    /// What was rendered: its name for prefix filters, and everything for the metrics and
    /// systemd's status line to read outside the registry.
    pub view: Arc<ClusterView>,
    /// When Proxmox last answered a check, if it has since the daemon started.
    pub last_success: Option<Instant>,
}

/// A place in the list: registration time at full precision, then id. The list shows
/// clusters in descending order of it.
type ListKey = (DateTime<Utc>, ClusterId);

impl ListEntry {
    /// Its place in the list.
    fn key(&self) -> ListKey {
        (self.created_at, self.id)
    }

    /// What the entry adds to the list's tag. Contributions are summed, so the tag follows a
    /// change of one entry in constant time; the order needs no part in it, as it follows
    /// from the keys.
    fn tag_contribution(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.id.hash(&mut hasher);
        self.rendered.etag.0.hash(&mut hasher);
        hasher.finish()
    }
}

/// A place in the list, as a page's `next_cursor` gives it: the last entry shown. Being a key
/// rather than an index, it stays valid when clusters are added or removed between pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The last shown entry's registration time, at full precision.
    pub created_at: DateTime<Utc>,
    /// The last shown entry's id, which orders entries registered at the same instant.
    pub id: ClusterId,
}

impl Cursor {
    /// Leads the encoding, so that a later format can tell its cursors from these.
    const VERSION: u8 = 1;
    const LEN: usize = 1 + 8 + 4 + 16;

    /// The cursor just after `entry`.
    fn after(entry: &ListEntry) -> Self {
        Self {
            created_at: entry.created_at,
            id: entry.id,
        }
    }

    /// Opaque to clients: lowercase hex of version, seconds, nanoseconds and id.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::with_capacity(Self::LEN);
        bytes.push(Self::VERSION);
        bytes.extend_from_slice(&self.created_at.timestamp().to_be_bytes());
        bytes.extend_from_slice(&self.created_at.timestamp_subsec_nanos().to_be_bytes());
        bytes.extend_from_slice(self.id.as_bytes());
        hex::encode(bytes)
    }

    /// A cursor [`Cursor::encode`] made; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        if bytes.len() != Self::LEN || bytes[0] != Self::VERSION {
            return None;
        }
        let secs = i64::from_be_bytes(bytes[1..9].try_into().ok()?);
        let nanos = u32::from_be_bytes(bytes[9..13].try_into().ok()?);
        let id = ClusterId::from_slice(&bytes[13..]).ok()?;
        // Only one spelling per cursor: uppercase hex is refused rather than aliased.
        if text.bytes().any(|b| b.is_ascii_uppercase()) || nanos >= 1_000_000_000 {
            return None;
        }
        Some(Self {
            created_at: DateTime::from_timestamp(secs, nanos)?,
            id,
        })
    }

    fn key(&self) -> (DateTime<Utc>, ClusterId) {
        (self.created_at, self.id)
    }
}

/// Which clusters a list shows. The default shows all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Keeps clusters showing any of these statuses; `None` keeps every status.
    pub statuses: Option<Vec<ClusterStatus>>,
    /// Keeps clusters whose name starts with this, case-sensitively.
    pub name_prefix: Option<String>,
}

impl ListFilter {
    fn is_everything(&self) -> bool {
        self.statuses.is_none() && self.name_prefix.is_none()
    }

    fn keeps(&self, entry: &ListEntry) -> bool {
        self.statuses
            .as_ref()
            .is_none_or(|statuses| statuses.contains(&entry.status))
            && self
                .name_prefix
                .as_ref()
                .is_none_or(|prefix| entry.view.name.starts_with(prefix.as_str()))
    }
}

/// A page: at most `limit` entries, after `after` (or from the start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// At most this many entries.
    pub limit: usize,
    /// Continue strictly after this place; `None` starts at the newest cluster.
    pub after: Option<Cursor>,
}

/// What a list request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Which clusters.
    pub filter: ListFilter,
    /// One page of them, or all when `None`; a page's body adds `next_cursor`.
    pub page: Option<Page>,
}

/// Every cluster at one moment; immutable, so handlers filter and page it outside the
/// registry. Taking one is a pointer copy of the registry's persistent map, however many
/// clusters there are.
#[derive(Debug)]
pub struct ListSnapshot {
    /// In ascending key order; shown newest first.
    entries: imbl::OrdMap<ListKey, Arc<ListEntry>>,
    /// The tag over every entry's tag.
    pub etag: Etag,
    /// The unfiltered body, rendered once on first use, by the first reader rather than by the
    /// registry.
    full_body: OnceLock<Bytes>,
    /// When the registry built it, to bound how old its bodies may get.
    built_at: Instant,
}

impl Default for ListSnapshot {
    fn default() -> Self {
        Self {
            entries: imbl::OrdMap::new(),
            etag: Etag::default(),
            full_body: OnceLock::new(),
            built_at: Instant::now(),
        }
    }
}

impl ListSnapshot {
    /// Every entry, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Arc<ListEntry>> {
        self.entries.values().rev()
    }

    /// Every cluster's figures, newest first, for the metrics and systemd's status line.
    pub fn figures(&self) -> Vec<ClusterSnapshot> {
        self.newest_first()
            .map(|entry| ClusterSnapshot {
                view: entry.view.clone(),
                seconds_since_success: entry.last_success.map(|at| at.elapsed().as_secs_f64()),
            })
            .collect()
    }

    /// The whole list, the seed shape `{"clusters": [...], "total": N}`.
    pub fn full_body(&self) -> Bytes {
        self.full_body
            .get_or_init(|| {
                let all: Vec<&Arc<ListEntry>> = self.newest_first().collect();
                render(&all, all.len(), None)
            })
            .clone()
    }

    /// The whole list with its tag.
    pub fn full(&self) -> Rendered {
        Rendered {
            body: self.full_body(),
            etag: self.etag,
        }
    }

    /// What `query` selects, rendered from the entries' bytes: `{"clusters", "total"}`, plus
    /// `next_cursor` for a page. `total` counts every cluster the filter keeps, on every page.
    /// The tag covers exactly what the body shows, so a change elsewhere in the list leaves a
    /// filtered page's tag as it was.
    pub fn query(&self, query: &ListQuery) -> Rendered {
        if query.filter.is_everything() && query.page.is_none() {
            return self.full();
        }
        let filter = &query.filter;
        let kept = |entry: &&Arc<ListEntry>| filter.keeps(entry);
        let Some(page) = query.page else {
            let shown: Vec<&Arc<ListEntry>> = self.newest_first().filter(kept).collect();
            return Rendered {
                body: render(&shown, shown.len(), None),
                etag: Etag::combine(shown.iter().map(|e| e.rendered.etag)),
            };
        };
        let total = if filter.is_everything() {
            self.entries.len()
        } else {
            self.newest_first().filter(kept).count()
        };
        // Newest first: what follows the cursor is everything with a smaller key.
        let before = page
            .after
            .map_or(Bound::Unbounded, |after| Bound::Excluded(after.key()));
        let mut rest = self
            .entries
            .range((Bound::Unbounded, before))
            .rev()
            .map(|(_, entry)| entry)
            .filter(kept);
        let shown: Vec<&Arc<ListEntry>> = rest.by_ref().take(page.limit).collect();
        let next_cursor = match (rest.next(), shown.last()) {
            (Some(_), Some(last)) => Some(Cursor::after(last).encode()),
            _ => None,
        };
        let mut hasher = DefaultHasher::new();
        "page".hash(&mut hasher);
        for entry in &shown {
            entry.rendered.etag.0.hash(&mut hasher);
        }
        total.hash(&mut hasher);
        next_cursor.hash(&mut hasher);
        Rendered {
            body: render(&shown, total, Some(next_cursor.as_deref())),
            etag: Etag(hasher.finish()),
        }
    }
}

/// `{"clusters": [...], "total": N}` from the entries' rendered bytes, with `"next_cursor"`
/// when `next_cursor` is given (as null on a last page).
fn render(
    entries: &[impl AsRef<ListEntry>],
    total: usize,
    next_cursor: Option<Option<&str>>,
) -> Bytes {
    // Sized exactly, so megabytes of list are copied once and never reallocated.
    let objects: usize = entries
        .iter()
        .map(|e| e.as_ref().rendered.body.len() + 1)
        .sum();
    let mut body = Vec::with_capacity(objects + 128);
    body.extend_from_slice(b"{\"clusters\":[");
    for (index, entry) in entries.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&entry.as_ref().rendered.body);
    }
    body.extend_from_slice(format!("],\"total\":{total}").as_bytes());
    match next_cursor {
        None => {}
        Some(None) => body.extend_from_slice(b",\"next_cursor\":null"),
        // Cursors are hex: nothing in them needs escaping.
        Some(Some(cursor)) => {
            body.extend_from_slice(format!(",\"next_cursor\":\"{cursor}\"").as_bytes());
        }
    }
    body.push(b'}');
    Bytes::from(body)
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
    /// Also in the list order, under its key.
    current: Arc<ListEntry>,
    changes: watch::Sender<Etag>,
    history: Option<Rendered>,
}

/// `{"transitions": [...], "total": N}`.
#[derive(Serialize)]
struct HistoryBody<'a> {
    transitions: &'a [Transition],
    total: usize,
}

/// The registry's rendered state. Every change goes through [`ReadModel::put_cluster`],
/// [`ReadModel::put_history`] or [`ReadModel::remove`].
pub struct ReadModel {
    entries: HashMap<ClusterId, Entry>,
    /// Every entry under its key; persistent, so a snapshot shares it rather than copies it.
    order: imbl::OrdMap<ListKey, Arc<ListEntry>>,
    /// The sum of every entry's [`ListEntry::tag_contribution`].
    list_tag: u64,
    snapshot: Option<Arc<ListSnapshot>>,
    /// Some entry's body changed since the snapshot was built; no tag did.
    snapshot_behind: bool,
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
            order: imbl::OrdMap::new(),
            list_tag: 0,
            snapshot: None,
            snapshot_behind: false,
            list_changes: watch::channel(0).0,
        }
    }

    /// Renders a cluster's representation; wakes its watchers and the list's when the tag
    /// changed. `created_at` is the full-precision registration time (the view's is rounded).
    ///
    /// Runs on the registry for every check, so it serialises once and hashes the bytes it
    /// sends; a check that changed nothing shown (several in one second) costs a comparison.
    pub fn put_cluster(
        &mut self,
        view: &ClusterView,
        created_at: DateTime<Utc>,
        last_success: Option<Instant>,
    ) {
        let body = match serde_json::to_vec(view) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "cannot render a cluster");
                return;
            }
        };
        if let Some(entry) = self.entries.get(&view.id)
            && entry.current.rendered.body == body[..]
            && entry.current.created_at == created_at
            && entry.current.last_success == last_success
        {
            return;
        }
        let etag = Etag::of_object_except(&body, UNTAGGED_MEMBER);
        let current = Arc::new(ListEntry {
            id: view.id,
            created_at,
            status: view.status,
            rendered: Rendered {
                body: Bytes::from(body),
                etag,
            },
            view: Arc::new(view.clone()),
            last_success,
        });
        let tag_changed = match self.entries.get_mut(&view.id) {
            Some(entry) => {
                let changed = entry.current.rendered.etag != etag;
                let old_key = entry.current.key();
                if old_key != current.key() {
                    self.order.remove(&old_key);
                }
                self.list_tag = self
                    .list_tag
                    .wrapping_sub(entry.current.tag_contribution())
                    .wrapping_add(current.tag_contribution());
                self.order.insert(current.key(), current.clone());
                entry.current = current;
                if changed {
                    entry.changes.send_replace(etag);
                }
                changed
            }
            None => {
                self.list_tag = self.list_tag.wrapping_add(current.tag_contribution());
                self.order.insert(current.key(), current.clone());
                self.entries.insert(
                    view.id,
                    Entry {
                        current,
                        changes: watch::channel(etag).0,
                        history: None,
                    },
                );
                true
            }
        };
        if tag_changed {
            self.snapshot = None;
            self.snapshot_behind = false;
            self.list_changes.send_modify(|generation| *generation += 1);
        } else if self.snapshot.is_some() {
            // Only `last_checked_at` moved: the list catches up within LIST_BODY_REFRESH, and
            // nobody is woken.
            self.snapshot_behind = true;
        }
    }

    /// Renders a cluster's history, newest first.
    pub fn put_history(&mut self, id: ClusterId, newest_first: &[Transition]) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let body = HistoryBody {
            transitions: newest_first,
            total: newest_first.len(),
        };
        match serde_json::to_vec(&body) {
            Ok(body) => {
                entry.history = Some(Rendered {
                    etag: Etag::of_bytes(&body),
                    body: Bytes::from(body),
                });
            }
            Err(e) => tracing::error!(error = %e, "cannot render a cluster's history"),
        }
    }

    /// Forgets a deleted cluster; its watchers see the channel close.
    pub fn remove(&mut self, id: ClusterId) {
        if let Some(entry) = self.entries.remove(&id) {
            self.order.remove(&entry.current.key());
            self.list_tag = self.list_tag.wrapping_sub(entry.current.tag_contribution());
            self.snapshot = None;
            self.snapshot_behind = false;
            self.list_changes.send_modify(|generation| *generation += 1);
        }
    }

    /// One cluster, if registered.
    pub fn cluster(&self, id: ClusterId) -> Option<ReadCluster> {
        self.entries.get(&id).map(|entry| ReadCluster {
            rendered: entry.current.rendered.clone(),
            changes: entry.changes.subscribe(),
        })
    }

    /// One cluster's history, if registered.
    pub fn history(&self, id: ClusterId) -> Option<Rendered> {
        self.entries
            .get(&id)
            .and_then(|entry| entry.history.clone())
    }

    /// The tag over the whole list: the sum of the entries' contributions, mixed with their
    /// number so that a removal and an addition cannot cancel out into an old tag.
    fn list_etag(&self) -> Etag {
        let mut hasher = DefaultHasher::new();
        self.list_tag.hash(&mut hasher);
        self.order.len().hash(&mut hasher);
        Etag(hasher.finish())
    }

    /// The list; rebuilt after a change of tags, or of bodies once the snapshot is
    /// [`LIST_BODY_REFRESH`] old.
    pub fn list(&mut self) -> ReadList {
        self.list_at(Instant::now())
    }

    fn list_at(&mut self, now: Instant) -> ReadList {
        let snapshot = match &self.snapshot {
            Some(snapshot)
                if !self.snapshot_behind
                    || now.saturating_duration_since(snapshot.built_at) < LIST_BODY_REFRESH =>
            {
                snapshot.clone()
            }
            _ => {
                let snapshot = Arc::new(ListSnapshot {
                    entries: self.order.clone(),
                    etag: self.list_etag(),
                    full_body: OnceLock::new(),
                    built_at: now,
                });
                self.snapshot = Some(snapshot.clone());
                self.snapshot_behind = false;
                snapshot
            }
        };
        ReadList {
            snapshot,
            changes: self.list_changes.subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AuthMethod, StatusReason};

    fn view(id: ClusterId, name: &str, status: ClusterStatus, checked: i64) -> ClusterView {
        let at = |secs| DateTime::from_timestamp(secs, 0).unwrap_or_default();
        ClusterView {
            id,
            name: name.to_owned(),
            api_endpoint: "https://pve.example.com:8006".to_owned(),
            status,
            proxmox_version: "8.4.1".to_owned(),
            node_count: 3,
            created_at: at(1_700_000_000),
            updated_at: at(1_700_000_000),
            last_checked_at: Some(at(1_700_000_000 + checked)),
            status_reason: StatusReason::Ok,
            last_error: Some("a \"last_checked_at\":1, in an error".to_owned()),
            nodes_online: 3,
            quorate: Some(true),
            auth_method: AuthMethod::Password,
            fingerprint: None,
            members: Vec::new(),
            active_endpoint: None,
        }
    }

    /// Registration instants one nanosecond apart, in the order given.
    fn registered(n: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default()
            + chrono::Duration::nanoseconds(n)
    }

    fn names(rendered: &Rendered) -> (Vec<String>, serde_json::Value) {
        let body: serde_json::Value = serde_json::from_slice(&rendered.body).unwrap_or_default();
        let names = body["clusters"]
            .as_array()
            .map(|clusters| {
                clusters
                    .iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        (names, body)
    }

    #[test]
    fn the_tag_ignores_last_checked_at_and_nothing_else() {
        let id = ClusterId::now_v7();
        let mut model = ReadModel::new();
        model.put_cluster(
            &view(id, "a", ClusterStatus::Healthy, 1),
            registered(0),
            None,
        );
        let first = model.cluster(id).map(|r| r.rendered);
        let mut changes = model.cluster(id).map(|r| r.changes);
        model.put_cluster(
            &view(id, "a", ClusterStatus::Healthy, 2),
            registered(0),
            None,
        );
        let second = model.cluster(id).map(|r| r.rendered);
        let (Some(first), Some(second)) = (first, second) else {
            panic!("the cluster is rendered");
        };
        assert_ne!(first.body, second.body, "last_checked_at is in the body");
        assert_eq!(first.etag, second.etag);
        assert!(
            changes
                .as_mut()
                .is_some_and(|c| !c.has_changed().unwrap_or(true))
        );

        model.put_cluster(
            &view(id, "a", ClusterStatus::Degraded, 2),
            registered(0),
            None,
        );
        let third = model.cluster(id).map(|r| r.rendered.etag);
        assert_ne!(third, Some(first.etag));
        assert!(
            changes
                .as_mut()
                .is_some_and(|c| c.has_changed().unwrap_or(false))
        );

        model.remove(id);
        assert!(changes.is_some_and(|c| c.has_changed().is_err()), "closed");
    }

    #[test]
    fn the_member_scan_finds_only_the_top_level_key() {
        let json = br#"{"a":"\"last_checked_at\":x","n":{"last_checked_at":1},"last_checked_at":"2024-01-01T00:00:00Z","z":[1]}"#;
        let range = top_level_value(json, "last_checked_at").unwrap_or(0..0);
        assert_eq!(&json[range], br#""2024-01-01T00:00:00Z""#);
        let null = br#"{"last_checked_at":null}"#;
        let range = top_level_value(null, "last_checked_at").unwrap_or(0..0);
        assert_eq!(&null[range], b"null");
        assert_eq!(
            top_level_value(br#"{"x":{"last_checked_at":1}}"#, "last_checked_at"),
            None
        );
    }

    #[test]
    fn etags_parse_weakly() {
        let tag = Etag(0x0123_4567_89ab_cdef);
        assert_eq!(Etag::parse(&tag.header()), Some(tag));
        assert_eq!(Etag::parse("\"0123456789abcdef\""), Some(tag));
        assert_eq!(Etag::parse(" 0123456789ABCDEF "), Some(tag));
        for other in [
            "",
            "*",
            "W/\"\"",
            "\"0123\"",
            "\"0123456789abcdeg\"",
            "W/\"+123456789abcdef\"",
        ] {
            assert_eq!(Etag::parse(other), None, "{other:?}");
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let cursor = Cursor {
            created_at: registered(123_456_789),
            id: ClusterId::now_v7(),
        };
        let text = cursor.encode();
        assert_eq!(Cursor::decode(&text), Some(cursor));
        for bad in [
            String::new(),
            "zz".to_owned(),
            text.to_uppercase(),
            text[2..].to_owned(),
            format!("02{}", &text[2..]),
            format!("{text}00"),
        ] {
            assert_eq!(Cursor::decode(&bad), None, "{bad:?}");
        }
    }

    /// Clusters `c0`..`c{n-1}`, registered in that order; even ones degraded.
    fn model_of(n: i64) -> (ReadModel, Vec<ClusterId>) {
        let mut model = ReadModel::new();
        let mut ids = Vec::new();
        for i in 0..n {
            let id = ClusterId::now_v7();
            let status = if i % 2 == 0 {
                ClusterStatus::Degraded
            } else {
                ClusterStatus::Healthy
            };
            model.put_cluster(&view(id, &format!("c{i}"), status, 0), registered(i), None);
            ids.push(id);
        }
        (model, ids)
    }

    fn page_query(limit: usize, after: Option<&str>) -> ListQuery {
        ListQuery {
            filter: ListFilter::default(),
            page: Some(Page {
                limit,
                after: after.and_then(Cursor::decode),
            }),
        }
    }

    #[test]
    fn pages_continue_after_their_cursor_across_inserts_and_deletes() {
        let (mut model, ids) = model_of(6);
        let first = model.list().snapshot.query(&page_query(2, None));
        let (shown, body) = names(&first);
        assert_eq!(shown, ["c5", "c4"]);
        assert_eq!(body["total"], 6);
        let cursor = body["next_cursor"].as_str().map(str::to_owned);

        // A newer cluster, the cursor's own entry and an unseen one go away between pages.
        model.put_cluster(
            &view(ClusterId::now_v7(), "c6", ClusterStatus::Healthy, 0),
            registered(6),
            None,
        );
        model.remove(ids[4]);
        model.remove(ids[2]);
        let second = model
            .list()
            .snapshot
            .query(&page_query(2, cursor.as_deref()));
        let (shown, body) = names(&second);
        assert_eq!(shown, ["c3", "c1"]);
        assert_eq!(body["total"], 5);
        let cursor = body["next_cursor"].as_str().map(str::to_owned);
        let last = model
            .list()
            .snapshot
            .query(&page_query(2, cursor.as_deref()));
        let (shown, body) = names(&last);
        assert_eq!(shown, ["c0"]);
        assert_eq!(body["next_cursor"], serde_json::Value::Null);
    }

    #[test]
    fn filters_count_and_tag_only_what_they_keep() {
        let (mut model, ids) = model_of(5);
        let degraded = ListQuery {
            filter: ListFilter {
                statuses: Some(vec![ClusterStatus::Degraded]),
                name_prefix: None,
            },
            page: None,
        };
        let before = model.list().snapshot.query(&degraded);
        let (shown, body) = names(&before);
        assert_eq!(shown, ["c4", "c2", "c0"]);
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(2),
            "clusters and total"
        );

        // A healthy cluster's change leaves the degraded page as it was.
        model.put_cluster(
            &view(ids[1], "c1", ClusterStatus::Unhealthy, 0),
            registered(1),
            None,
        );
        let after = model.list().snapshot.query(&degraded);
        assert_eq!(after.etag, before.etag);
        assert_eq!(after.body, before.body);

        let prefixed = ListQuery {
            filter: ListFilter {
                statuses: None,
                name_prefix: Some("c3".to_owned()),
            },
            page: Some(Page {
                limit: 1,
                after: None,
            }),
        };
        let (shown, body) = names(&model.list().snapshot.query(&prefixed));
        assert_eq!(shown, ["c3"]);
        assert_eq!(body["total"], 1);
        assert_eq!(body["next_cursor"], serde_json::Value::Null);
    }

    #[test]
    fn the_unfiltered_list_keeps_the_seed_shape() {
        let (mut model, _) = model_of(2);
        let full = model.list().snapshot.query(&ListQuery::default());
        let (shown, body) = names(&full);
        assert_eq!(shown, ["c1", "c0"]);
        let keys: Vec<&String> = body
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, ["clusters", "total"]);
        let empty = ReadModel::new().list().snapshot.full_body();
        assert_eq!(&empty[..], br#"{"clusters":[],"total":0}"#);
    }

    #[test]
    fn body_only_changes_reach_the_list_within_the_refresh() {
        let (mut model, ids) = model_of(2);
        let start = Instant::now();
        let first = model.list_at(start);
        let changes = first.changes.clone();
        model.put_cluster(
            &view(ids[0], "c0", ClusterStatus::Degraded, 9),
            registered(0),
            None,
        );
        let soon = model.list_at(start);
        assert!(
            Arc::ptr_eq(&first.snapshot, &soon.snapshot),
            "no rebuild yet"
        );
        assert!(!changes.has_changed().unwrap_or(true), "nobody woken");

        let later = model.list_at(start + LIST_BODY_REFRESH);
        assert!(!Arc::ptr_eq(&first.snapshot, &later.snapshot));
        assert_eq!(later.snapshot.etag, first.snapshot.etag);
        assert_eq!(
            later
                .snapshot
                .newest_first()
                .nth(1)
                .map(|e| e.rendered.body.clone())
                .unwrap_or_default(),
            model
                .cluster(ids[0])
                .map(|r| r.rendered.body)
                .unwrap_or_default()
        );

        // A tag change shows at once and wakes list watchers.
        model.put_cluster(
            &view(ids[1], "c1", ClusterStatus::Unknown, 9),
            registered(1),
            None,
        );
        let now = model.list_at(start + LIST_BODY_REFRESH);
        assert_ne!(now.snapshot.etag, later.snapshot.etag);
        assert!(changes.has_changed().unwrap_or(false));
    }
}
