//! Changing a registered cluster's settings (`PATCH`): anything that affects the connection is
//! verified against Proxmox exactly as a registration is, before anything changes; the change
//! is then stored durably, applied, and the monitor restarted on it. Changes to one cluster
//! run one after another, in the order they came.

use std::collections::VecDeque;

use chrono::Utc;
use ractor::{ActorRef, RpcReplyPort};

use super::registration::{discovered_members, spawn_probe};
use super::supervision::spawn_monitor;
use super::{RegistryError, RegistryMsg, RegistryState, publish, render};
use crate::cluster::{CheckOutcome, Cluster, ClusterView, SettingsChange};
use crate::domain::{
    ClusterId, ClusterName, Credentials, Endpoint, ProxmoxUser, Secret, TokenId, ValidationError,
};
use crate::events::EventKind;
use crate::proxmox::{ProbeReport, ProxmoxError};
use crate::store::{StoreError, WriteBatch};
use crate::tls::Fingerprint;

/// A validated `PATCH` body: each field present is a new value.
#[derive(Debug, Default)]
pub struct ClusterPatch {
    /// A new name.
    pub name: Option<ClusterName>,
    /// A new registered endpoint.
    pub endpoint: Option<Endpoint>,
    /// A new Proxmox user.
    pub username: Option<ProxmoxUser>,
    /// A new password; makes a token cluster a password cluster.
    pub password: Option<Secret>,
    /// A new token name, as sent: it is checked against the resulting username.
    pub token_id: Option<String>,
    /// A new token secret.
    pub token_secret: Option<Secret>,
    /// A new pin (`Some(None)` removes it).
    pub fingerprint: Option<Option<Fingerprint>>,
}

impl ClusterPatch {
    /// Whether any field that decides how the daemon reaches Proxmox is present: those are
    /// verified, even with an unchanged value.
    fn touches_connection(&self) -> bool {
        self.endpoint.is_some()
            || self.username.is_some()
            || self.password.is_some()
            || self.token_id.is_some()
            || self.token_secret.is_some()
            || self.fingerprint.is_some()
    }
}

/// The changes waiting for one cluster, and the one under way.
#[derive(Default)]
pub(super) struct PatchQueue {
    waiting: VecDeque<(ClusterPatch, Reply)>,
    active: Option<ActivePatch>,
}

type Reply = RpcReplyPort<Result<ClusterView, RegistryError>>;

/// The change under way: being verified, then being stored.
struct ActivePatch {
    target: Target,
    reply: Reply,
    /// Set once verification passed and the writer has the change.
    staged: Option<Staged>,
}

/// The settings a change would leave.
struct Target {
    name: ClusterName,
    endpoint: Endpoint,
    credentials: Credentials,
    fingerprint: Option<Fingerprint>,
    /// The fields whose values differ from the stored ones.
    fields: Vec<String>,
    /// Proxmox must accept the result first.
    verify: bool,
    /// The endpoint or its trust changed: the members are discovered anew.
    trust_changed: bool,
}

struct Staged {
    change: SettingsChange,
    /// When the change was made, as stored.
    at: chrono::DateTime<Utc>,
    /// The history entry stored with the change, under its reserved sequence number.
    entry: Option<(u64, crate::cluster::Transition)>,
    /// What verification saw; `None` for a rename.
    report: Option<ProbeReport>,
}

impl RegistryState {
    /// The name a change under way would give some cluster.
    pub(super) fn name_claimed_by_a_change(&self, name: &ClusterName) -> bool {
        self.patches
            .values()
            .filter_map(|queue| queue.active.as_ref())
            .any(|active| &active.target.name == name)
    }

    /// Whether a change of `id` is being stored: the periodic flush leaves the cluster out
    /// meanwhile, as its record there still has the old settings.
    pub(super) fn change_being_stored(&self, id: ClusterId) -> bool {
        self.patches
            .get(&id)
            .and_then(|queue| queue.active.as_ref())
            .is_some_and(|active| active.staged.is_some())
    }
}

/// Queues a change; it starts at once unless another change of the cluster is under way.
pub(super) fn on_patch(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    patch: ClusterPatch,
    reply: Reply,
) {
    if !state.clusters.contains_key(&id) || state.deleting.contains_key(&id) {
        let _ = reply.send(Err(RegistryError::NotFound));
        return;
    }
    let queue = state.patches.entry(id).or_default();
    queue.waiting.push_back((patch, reply));
    if queue.active.is_none() {
        start_next(myself, state, id);
    }
}

/// Starts the next waiting change of `id`, answering those that need no work on the way.
fn start_next(myself: &ActorRef<RegistryMsg>, state: &mut RegistryState, id: ClusterId) {
    loop {
        let Some(queue) = state.patches.get_mut(&id) else {
            return;
        };
        queue.active = None;
        let Some((patch, reply)) = queue.waiting.pop_front() else {
            state.patches.remove(&id);
            return;
        };
        let gone = state.deleting.contains_key(&id);
        let Some(cluster) = state.clusters.get(&id).filter(|_| !gone) else {
            let _ = reply.send(Err(RegistryError::NotFound));
            continue;
        };
        let verify = patch.touches_connection();
        let target = match resolve(state, cluster, patch) {
            Ok(target) => target,
            Err(e) => {
                let _ = reply.send(Err(e));
                continue;
            }
        };
        if !verify && target.fields.is_empty() {
            // Nothing to change, `updated_at` included.
            let _ = reply.send(Ok(cluster.view(state.stale_after())));
            continue;
        }
        let name = cluster.record.name.clone();
        let mut active = ActivePatch {
            target,
            reply,
            staged: None,
        };
        if verify {
            let target = &active.target;
            tracing::info!(cluster = %name, cluster_id = %id, fields = ?target.fields, "verifying changed settings with Proxmox");
            spawn_probe(
                myself,
                state,
                target.endpoint.clone(),
                target.fingerprint,
                target.credentials.clone(),
                move |result| RegistryMsg::PatchProbed(id, result),
            );
        } else if let Err(e) = stage(myself, state, id, &mut active, None) {
            let _ = active.reply.send(Err(e));
            continue;
        }
        if let Some(queue) = state.patches.get_mut(&id) {
            queue.active = Some(active);
        }
        return;
    }
}

/// The settings `patch` leaves `cluster` with, or why they are not acceptable.
fn resolve(
    state: &RegistryState,
    cluster: &Cluster,
    patch: ClusterPatch,
) -> Result<Target, RegistryError> {
    let record = &cluster.record;
    let mut fields = Vec::new();
    let verify = patch.touches_connection();
    let name = match patch.name {
        Some(name) if name != record.name => {
            if state.name_taken(&name) {
                return Err(RegistryError::Conflict);
            }
            fields.push("name");
            name
        }
        _ => record.name.clone(),
    };
    let endpoint = patch
        .endpoint
        .unwrap_or_else(|| record.api_endpoint.clone());
    let username = patch.username.unwrap_or_else(|| record.username.clone());
    let credentials = resolve_credentials(
        &cluster.credentials,
        username,
        patch.password,
        patch.token_id,
        patch.token_secret,
    )?;
    let fingerprint = patch.fingerprint.unwrap_or(record.fingerprint);
    if fingerprint.is_some() && !endpoint.is_https() {
        return Err(RegistryError::Invalid(ValidationError::new(
            "fingerprint",
            "Fingerprint needs an https endpoint",
            "a certificate can only be pinned on https; send \"fingerprint\": null with an http endpoint",
        )));
    }
    let trust_changed = endpoint != record.api_endpoint || fingerprint != record.fingerprint;
    if endpoint != record.api_endpoint {
        fields.push("api_endpoint");
    }
    let old = &cluster.credentials;
    if credentials.username() != old.username() {
        fields.push("username");
    }
    match (&credentials, old) {
        (Credentials::Password { password, .. }, Credentials::Password { password: was, .. }) => {
            if password != was {
                fields.push("password");
            }
        }
        (Credentials::Password { .. }, Credentials::Token { .. }) => {
            fields.extend(["password", "token_id", "token_secret"]);
        }
        (Credentials::Token { .. }, Credentials::Password { .. }) => {
            fields.extend(["password", "token_id", "token_secret"]);
        }
        (
            Credentials::Token {
                token_id, secret, ..
            },
            Credentials::Token {
                token_id: was_id,
                secret: was_secret,
                ..
            },
        ) => {
            if token_id != was_id {
                fields.push("token_id");
            }
            if secret != was_secret {
                fields.push("token_secret");
            }
        }
    }
    if fingerprint != record.fingerprint {
        fields.push("fingerprint");
    }
    Ok(Target {
        name,
        endpoint,
        credentials,
        fingerprint,
        fields: fields.into_iter().map(str::to_owned).collect(),
        verify,
        trust_changed,
    })
}

/// The credentials after a change: a password makes a password cluster, a token id with its
/// secret a token cluster; what is not sent is kept. A result that is neither is refused.
fn resolve_credentials(
    current: &Credentials,
    username: ProxmoxUser,
    password: Option<Secret>,
    token_id: Option<String>,
    token_secret: Option<Secret>,
) -> Result<Credentials, RegistryError> {
    let invalid = |field, message: &str, reason: &str| {
        Err(RegistryError::Invalid(ValidationError::new(
            field, message, reason,
        )))
    };
    match (password, token_id, token_secret) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => invalid(
            "password",
            "Give either a password or an API token, not both",
            "send password, or token_id and token_secret",
        ),
        (Some(password), None, None) => Ok(Credentials::Password { username, password }),
        (None, None, None) => Ok(match current {
            Credentials::Password { password, .. } => Credentials::Password {
                username,
                password: password.clone(),
            },
            Credentials::Token {
                token_id, secret, ..
            } => Credentials::Token {
                username,
                token_id: token_id.clone(),
                secret: secret.clone(),
            },
        }),
        (None, token_id, secret) => {
            let (stored_id, stored_secret) = match current {
                Credentials::Token {
                    token_id, secret, ..
                } => (Some(token_id.as_str().to_owned()), Some(secret.clone())),
                Credentials::Password { .. } => (None, None),
            };
            let Some(token_id) = token_id.or(stored_id) else {
                return invalid(
                    "token_id",
                    "Token ID is required",
                    "token_secret needs its token_id",
                );
            };
            let Some(secret) = secret.or(stored_secret) else {
                return invalid(
                    "token_secret",
                    "Token secret is required",
                    "token_id needs its token_secret",
                );
            };
            let token_id = TokenId::parse(&token_id, &username).map_err(RegistryError::Invalid)?;
            Ok(Credentials::Token {
                username,
                token_id,
                secret,
            })
        }
    }
}

/// Proxmox answered the verification of the change under way.
pub(super) fn on_patch_probed(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    result: Result<ProbeReport, ProxmoxError>,
) {
    let Some(mut active) = state.patches.get_mut(&id).and_then(|q| q.active.take()) else {
        return;
    };
    let outcome = match result {
        _ if !state.clusters.contains_key(&id) || state.deleting.contains_key(&id) => {
            Err(RegistryError::NotFound)
        }
        Err(e) => {
            tracing::info!(cluster_id = %id, endpoint = %active.target.endpoint, error = %e, "changed settings refused by the Proxmox probe; nothing changed");
            Err(e.into())
        }
        Ok(report) => stage(myself, state, id, &mut active, Some(report)),
    };
    match outcome {
        Ok(()) => {
            if let Some(queue) = state.patches.get_mut(&id) {
                queue.active = Some(active);
            }
        }
        Err(e) => {
            let _ = active.reply.send(Err(e));
            start_next(myself, state, id);
        }
    }
}

/// Hands the changed record to the writer; it is applied once durable.
fn stage(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    active: &mut ActivePatch,
    report: Option<ProbeReport>,
) -> Result<(), RegistryError> {
    let Some(cluster) = state.clusters.get(&id) else {
        return Err(RegistryError::NotFound);
    };
    let target = &active.target;
    let credential = if target.verify {
        state
            .vault
            .seal(target.credentials.secret(), id.as_bytes())?
    } else {
        cluster.record.credential.clone()
    };
    let members = match &report {
        Some(report) if target.trust_changed => Some(discovered_members(
            state,
            &target.endpoint,
            target.fingerprint,
            report,
        )),
        _ => None,
    };
    let change = SettingsChange {
        name: target.name.clone(),
        api_endpoint: target.endpoint.clone(),
        credentials: target.credentials.clone(),
        credential,
        fingerprint: target.fingerprint,
        members,
        fields: target.fields.clone(),
    };
    // The history entry goes with the record, in one transaction: with a shared store the
    // instance that monitors the cluster sees both at once.
    let at = Utc::now();
    let Some(cluster) = state.clusters.get_mut(&id) else {
        return Err(RegistryError::NotFound);
    };
    let entry = cluster
        .settings_transition(&change, at)
        .map(|transition| (cluster.reserve_sequence(), transition));
    let mut record = cluster.record.with_settings(&change);
    if entry.is_some() {
        record.updated_at = at;
    }
    let mut batch = WriteBatch::default();
    batch.records.insert(id, record);
    if let Some((sequence, transition)) = &entry {
        batch.history.push((id, *sequence, transition.clone()));
    }
    let stored = state.writer.write_durably(batch);
    let registry = myself.clone();
    tokio::spawn(async move {
        let result = stored.await;
        let _ = registry.cast(RegistryMsg::PatchStored(id, result));
    });
    active.staged = Some(Staged {
        change,
        at,
        entry,
        report,
    });
    Ok(())
}

/// The writer is done with the change under way: on success it is applied and the monitor
/// restarted on it.
pub(super) fn on_patch_stored(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    result: Result<(), StoreError>,
) {
    let Some(active) = state.patches.get_mut(&id).and_then(|q| q.active.take()) else {
        return;
    };
    let Some(staged) = active.staged else {
        return;
    };
    if let Err(e) = result {
        tracing::error!(cluster_id = %id, error = %e, "cannot store changed settings");
        let _ = active.reply.send(Err(e.into()));
        start_next(myself, state, id);
        return;
    }
    let threshold = state.settings.failure_threshold;
    let stale_after = state.stale_after();
    let Some(cluster) = state.clusters.get_mut(&id) else {
        let _ = active.reply.send(Err(RegistryError::NotFound));
        start_next(myself, state, id);
        return;
    };
    let now = Utc::now();
    let old_name = cluster.record.name.clone();
    let fields = staged.change.fields.clone();
    cluster.apply_settings(staged.change, staged.at, staged.entry);
    let runs_monitors = state.leadership.role.runs_monitors();
    let session = staged.report.map(|report| {
        // What verification saw is the cluster's newest check; on a follower the leader's
        // monitor decides the status.
        if runs_monitors {
            cluster.apply_check(
                CheckOutcome::Answered {
                    health: report.status.health,
                    version: Some(report.version),
                },
                threshold,
                now,
            );
        }
        report.session
    });
    let view = cluster.view(stale_after);
    tracing::info!(cluster = %view.name, cluster_id = %id, fields = ?fields, status = %view.status, "cluster settings changed");
    if old_name != cluster.record.name {
        state.names.remove(&old_name);
        state.names.insert(cluster.record.name.clone());
    }
    state.dirty.insert(id);
    render(state, id, true);
    publish(state, EventKind::Updated, &view);
    if let Some(session) = session {
        // The old monitor holds the old settings; forget it before it is killed, so its end
        // is not taken for a failure, and start afresh: no auth back-off, a check at once.
        if let Some(monitor) = state.monitors.remove(&id) {
            state.monitor_owners.remove(&monitor.actor.get_id());
            monitor.actor.kill();
        }
        state.restarts.remove(&id);
        spawn_monitor(myself, state, id, Some(session), true);
    }
    let _ = active.reply.send(Ok(view));
    start_next(myself, state, id);
}
