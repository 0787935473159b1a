//! Several instances sharing one store: taking the leadership's word on who runs monitors, and
//! taking in what other instances wrote.
//!
//! Each change arrives here once more after this instance wrote it itself; those echoes find
//! the state already as they describe it and change nothing.

use ractor::ActorRef;

use super::supervision::spawn_monitor;
use super::{RegistryMsg, RegistryState, on_deletion_stored, publish, render};
use crate::cluster::{Cluster, ClusterRecord};
use crate::domain::ClusterId;
use crate::events::EventKind;
use crate::leadership::Leadership;
use crate::store::RemoteChange;

/// The election changed this instance's part, or the leader it follows.
pub(super) fn on_leadership(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    leadership: Leadership,
) {
    let was = state.leadership.role;
    let now = leadership.role;
    state.leadership = leadership;
    if now.runs_monitors() && !was.runs_monitors() {
        let ids: Vec<ClusterId> = state.clusters.keys().copied().collect();
        tracing::info!(clusters = ids.len(), "leading: starting the monitors");
        for id in ids {
            if let Some(cluster) = state.clusters.get_mut(&id) {
                cluster.mark_observed();
            }
            // Rendered, so that it has a deadline to go stale by.
            super::render(state, id, false);
            spawn_monitor(myself, state, id, None, false);
        }
    } else if was.runs_monitors() && !now.runs_monitors() {
        tracing::warn!(
            monitors = state.monitors.len(),
            "no longer the leader: stopping the monitors"
        );
        // Forgotten before they are killed, so their ends are not taken for failures.
        for (_, monitor) in state.monitors.drain() {
            monitor.actor.kill();
        }
        state.monitor_owners.clear();
        state.restarts.clear();
        // The new leader writes its own results; these would be rejected by the fence.
        state.dirty.clear();
        let waiting: Vec<ClusterId> = state.check_waiters.keys().copied().collect();
        for id in waiting {
            super::supervision::answer_check_waiters(state, id, None);
        }
        // What this instance saw last as leader may never have been stored: take the store's.
        resynchronise(myself, &state.store);
    }
}

/// Changes other instances (or the leader) stored. With `full`, `changes` is everything
/// stored, after the watch broke: clusters it does not name were deleted meanwhile.
pub(super) fn on_remote(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    full: bool,
    changes: Vec<RemoteChange>,
) {
    if full {
        let present: std::collections::HashSet<ClusterId> = changes
            .iter()
            .filter_map(|change| match change {
                RemoteChange::Cluster(record) => Some(record.id),
                _ => None,
            })
            .collect();
        let gone: Vec<ClusterId> = state
            .clusters
            .keys()
            .filter(|id| !present.contains(id) && !state.deleting.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            on_deletion_stored(state, id, Ok(()));
        }
    }
    for change in changes {
        match change {
            RemoteChange::Cluster(record) => on_remote_cluster(myself, state, *record),
            RemoteChange::Status(status) => on_remote_status(state, &status),
            RemoteChange::Deleted(id) => {
                // A deletion of our own is finished by its writer's answer.
                if state.clusters.contains_key(&id) && !state.deleting.contains_key(&id) {
                    on_deletion_stored(state, id, Ok(()));
                }
            }
            RemoteChange::Histories(id, stored) => {
                if let Some(cluster) = state.clusters.get_mut(&id) {
                    cluster.replace_history(stored);
                    render(state, id, true);
                }
            }
            RemoteChange::History(id, sequence, transition) => {
                if state.change_being_stored(id) {
                    continue;
                }
                if let Some(cluster) = state.clusters.get_mut(&id)
                    && cluster.mirror_history(sequence, transition)
                {
                    render(state, id, true);
                }
            }
        }
    }
}

fn on_remote_cluster(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    record: ClusterRecord,
) {
    let id = record.id;
    // Our own registration or settings change: its writer's answer finishes it.
    if state.storing.values().any(|s| s.cluster.id() == id)
        || state.change_being_stored(id)
        || state.deleting.contains_key(&id)
    {
        return;
    }
    let credentials = match state
        .vault
        .open(&record.credential, id.as_bytes())
        .ok()
        .and_then(|secret| record.credentials(secret))
    {
        Some(credentials) => credentials,
        None => {
            tracing::error!(cluster_id = %id, "a cluster stored by another instance cannot be decrypted with this key; ignoring it");
            return;
        }
    };
    let runs_monitors = state.leadership.role.runs_monitors();
    let stale_after = state.stale_after();
    let Some(cluster) = state.clusters.get_mut(&id) else {
        let cluster = Cluster::mirrored(record, credentials, Vec::new());
        let view = cluster.view(stale_after);
        tracing::info!(cluster = %view.name, cluster_id = %id, "cluster registered on another instance");
        state.names.insert(cluster.record.name.clone());
        state.clusters.insert(id, cluster);
        render(state, id, true);
        publish(state, EventKind::Registered, &view);
        if runs_monitors {
            spawn_monitor(myself, state, id, None, true);
        }
        return;
    };
    let settings_changed = cluster.record.settings_differ(&record);
    if !settings_changed && runs_monitors {
        return;
    }
    let old_name = cluster.record.name.clone();
    if runs_monitors {
        cluster.adopt_remote_settings(record, credentials);
    } else {
        let unchanged =
            serde_json::to_value(&cluster.record).ok() == serde_json::to_value(&record).ok();
        if unchanged {
            return;
        }
        cluster.record = record;
        cluster.credentials = credentials;
        cluster.mark_observed();
    }
    let new_name = cluster.record.name.clone();
    let view = cluster.view(stale_after);
    if old_name != new_name {
        state.names.remove(&old_name);
        state.names.insert(new_name);
    }
    render(state, id, false);
    publish(state, EventKind::Updated, &view);
    if runs_monitors && settings_changed {
        // The monitor checks with the new settings at once, as after a local change.
        if let Some(monitor) = state.monitors.remove(&id) {
            state.monitor_owners.remove(&monitor.actor.get_id());
            monitor.actor.kill();
        }
        state.dirty.insert(id);
        spawn_monitor(myself, state, id, None, true);
    }
}

fn on_remote_status(state: &mut RegistryState, status: &ClusterRecord) {
    // The leader's own results come back here; it knows them already.
    if state.leadership.role.runs_monitors() {
        return;
    }
    let stale_after = state.stale_after();
    let Some(cluster) = state.clusters.get_mut(&status.id) else {
        return;
    };
    let before = cluster.view(stale_after);
    cluster.adopt_remote_status(status);
    let after = cluster.view(stale_after);
    if before != after {
        render(state, status.id, false);
        if shown_differently(&before, &after) {
            publish(state, EventKind::Updated, &after);
        }
    }
}

/// Whether more than the check time changed.
fn shown_differently(
    before: &crate::cluster::ClusterView,
    after: &crate::cluster::ClusterView,
) -> bool {
    let mut before = before.clone();
    before.last_checked_at = after.last_checked_at;
    before != *after
}

/// Follows the changes stored in etcd after `revision` into the registry until `stop`. When
/// the watch breaks (etcd gone, history compacted), it waits for etcd, reloads everything and
/// hands it over as a full resynchronisation.
#[cfg(feature = "etcd")]
pub async fn follow(
    store: crate::store::etcd::EtcdStore,
    revision: i64,
    registry: ActorRef<RegistryMsg>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut revision = revision;
    let follow_all = async {
        loop {
            let delivered = store
                .follow(revision, |changes| {
                    registry
                        .cast(RegistryMsg::Remote {
                            full: false,
                            changes,
                        })
                        .is_ok()
                })
                .await;
            match delivered {
                // The registry has stopped.
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "following etcd broke; reloading"),
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                match store.snapshot().await {
                    Ok(loaded) => {
                        revision = loaded.revision.unwrap_or(revision);
                        let all = snapshot_changes(loaded);
                        if registry
                            .cast(RegistryMsg::Remote {
                                full: true,
                                changes: all,
                            })
                            .is_err()
                        {
                            return;
                        }
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "etcd still unreachable"),
                }
            }
        }
    };
    tokio::select! {
        () = follow_all => {}
        _ = stop.wait_for(|stop| *stop) => {}
    }
}

/// A snapshot as the changes that make a registry equal to it.
#[cfg(feature = "etcd")]
fn snapshot_changes(loaded: crate::store::Loaded) -> Vec<RemoteChange> {
    let mut histories = loaded.histories;
    let mut changes = Vec::new();
    for record in loaded.records {
        let id = record.id;
        let status = Box::new(record.clone());
        changes.push(RemoteChange::Cluster(Box::new(record)));
        changes.push(RemoteChange::Status(status));
        changes.push(RemoteChange::Histories(
            id,
            histories.remove(&id).unwrap_or_default(),
        ));
    }
    changes
}

/// Reloads everything from a shared store and hands it to the registry as a full
/// resynchronisation.
fn resynchronise(myself: &ActorRef<RegistryMsg>, store: &crate::store::Store) {
    match store {
        // One instance: nothing stored elsewhere to take.
        crate::store::Store::Redb(_) => {
            let _ = myself;
        }
        #[cfg(feature = "etcd")]
        crate::store::Store::Etcd(etcd) => {
            let etcd = (**etcd).clone();
            let registry = myself.clone();
            tokio::spawn(async move {
                match etcd.snapshot().await {
                    Ok(loaded) => {
                        let _ = registry.cast(RegistryMsg::Remote {
                            full: true,
                            changes: snapshot_changes(loaded),
                        });
                    }
                    // The watch's own reload catches up once etcd answers.
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reload from etcd after stepping down")
                    }
                }
            });
        }
    }
}
