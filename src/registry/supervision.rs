//! Monitor lifecycle: spawning, restarting with back-off, and taking their reports.

use std::time::{Duration, Instant};

use chrono::Utc;
use ractor::{ActorRef, ActorRuntime, RpcReplyPort, SupervisionEvent};

use super::{
    FIRST_RESTART_DELAY, HEALTHY_PERIOD, MAX_RESTART_DELAY, RegistryError, RegistryMsg,
    RegistryState, publish, render,
};
use crate::cluster::{CheckOutcome, Cluster, ClusterView};
use crate::domain::{ClusterId, ClusterStatus, StatusReason};
use crate::events::EventKind;
use crate::monitor::{MonitorActor, MonitorArgs, MonitorMsg};
use crate::proxmox::Session;
use crate::proxmox::members::MemberReport;

pub(super) struct MonitorHandle {
    pub(super) actor: ActorRef<MonitorMsg>,
    pub(super) generation: u64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct RestartBackoff {
    delay: Duration,
    last_restart: Instant,
}

/// A monitor ended: unless its cluster is gone, restart it after a back-off.
pub(super) fn on_monitor_ended(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    event: SupervisionEvent,
) {
    let (cell, why) = match event {
        SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
        SupervisionEvent::ActorTerminated(cell, _, reason) => {
            (cell, reason.unwrap_or_else(|| "stopped".to_owned()))
        }
        _ => return,
    };
    // Monitors we killed ourselves (deleted clusters) were forgotten already.
    let Some(id) = state.monitor_owners.remove(&cell.get_id()) else {
        return;
    };
    state.monitors.remove(&id);
    if !state.clusters.contains_key(&id) {
        return;
    }
    let now = Instant::now();
    let backoff = match state.restarts.get(&id) {
        Some(b) if now.duration_since(b.last_restart) < HEALTHY_PERIOD + b.delay => {
            RestartBackoff {
                delay: (b.delay * 2).min(MAX_RESTART_DELAY),
                last_restart: now,
            }
        }
        _ => RestartBackoff {
            delay: FIRST_RESTART_DELAY,
            last_restart: now,
        },
    };
    state.restarts.insert(id, backoff);
    metrics::counter!("proxmoxer_monitor_restarts_total").increment(1);
    let name = state
        .clusters
        .get(&id)
        .map(|c| c.record.name.to_string())
        .unwrap_or_default();
    tracing::warn!(
        cluster = %name,
        cluster_id = %id,
        reason = %why,
        restart_in = %humantime::format_duration(backoff.delay),
        "monitor failed; restarting it"
    );
    myself.send_after(backoff.delay, move || RegistryMsg::RestartMonitor(id));
}

pub(super) fn on_check_completed(
    state: &mut RegistryState,
    id: ClusterId,
    generation: u64,
    outcome: Option<CheckOutcome>,
    members: Option<MemberReport>,
) {
    // A report from a monitor that has since been replaced or deleted is stale.
    if state.monitors.get(&id).map(|m| m.generation) != Some(generation) {
        return;
    }
    let threshold = state.settings.failure_threshold;
    let stale_after = state.stale_after();
    let Some(cluster) = state.clusters.get_mut(&id) else {
        return;
    };
    let now = Utc::now();
    let mut effect = crate::cluster::CheckEffect::default();
    if let Some(outcome) = outcome {
        if let CheckOutcome::Failed(error) = &outcome {
            metrics::counter!("proxmoxer_check_failures_total", "reason" => error.status_reason().to_string())
                .increment(1);
        }
        effect = cluster.apply_check(outcome, threshold, now);
        if let Some((old, new)) = effect.status_change {
            log_status_change(cluster, old, new);
        }
    }
    let members_effect = members
        .map(|members| cluster.apply_members(members, now))
        .unwrap_or_default();
    let history_changed = effect.history_changed || members_effect.history_changed;
    if history_changed {
        state.dirty.insert(id);
    }
    if effect.changed || members_effect.changed {
        let view = cluster.view(stale_after);
        state.dirty.insert(id);
        publish(state, EventKind::Updated, &view);
    }
    // `last_checked_at` moved at least, so the body is re-rendered (its tag only if more did).
    render(state, id, history_changed);
}

fn log_status_change(cluster: &Cluster, old: ClusterStatus, new: ClusterStatus) {
    let record = &cluster.record;
    let reason: StatusReason = record.status_reason;
    tracing::info!(
        cluster = %record.name,
        cluster_id = %record.id,
        %reason,
        error = record.last_error.as_deref().unwrap_or(""),
        "cluster status {old} -> {new}"
    );
}

pub(super) fn spawn_monitor(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    session: Option<Session>,
    check_at_once: bool,
) {
    // Followers leave the checks to the leader.
    if !state.leadership.role.runs_monitors() {
        return;
    }
    let Some(cluster) = state.clusters.get(&id) else {
        return;
    };
    state.next_generation += 1;
    let generation = state.next_generation;
    let args = MonitorArgs {
        cluster_id: id,
        generation,
        endpoint: cluster.record.api_endpoint.clone(),
        fingerprint: cluster.record.fingerprint,
        trust: state.trust.clone(),
        credentials: cluster.credentials.clone(),
        members: cluster.record.members.clone(),
        active_endpoint: cluster.record.active_endpoint.clone(),
        session,
        settings: state.settings.monitor.clone(),
        registry: myself.clone(),
        check_at_once,
    };
    // The actor's task runs on the runtime it is spawned from. Not waiting for its start
    // keeps the registry (and every read queued behind it) off the Proxmox thread's schedule;
    // a monitor's start cannot fail, and messages sent meanwhile wait in its mailbox.
    let spawned = {
        let _on_proxmox_thread = state.proxmox.enter();
        ActorRuntime::spawn_linked_instant(None, MonitorActor, args, myself.get_cell())
    };
    match spawned {
        Ok((actor, _)) => {
            state.monitor_owners.insert(actor.get_id(), id);
            state
                .monitors
                .insert(id, MonitorHandle { actor, generation });
        }
        Err(e) => {
            // Never `?` here: an error out of a handler would stop the registry.
            tracing::error!(cluster_id = %id, error = %e, "cannot start monitor; retrying");
            myself.send_after(MAX_RESTART_DELAY, move || RegistryMsg::RestartMonitor(id));
        }
    }
}

/// Clients waiting for a check they asked for, and the round their deadline belongs to.
pub(super) struct CheckWaiters {
    replies: Vec<RpcReplyPort<Result<ClusterView, RegistryError>>>,
    round: u64,
}

/// An operator asked for a check: the monitor runs one (or lets one in flight count), and
/// every request that arrives meanwhile shares it.
pub(super) fn on_check_now(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    reply: RpcReplyPort<Result<ClusterView, RegistryError>>,
) {
    if !state.clusters.contains_key(&id) || state.deleting.contains_key(&id) {
        let _ = reply.send(Err(RegistryError::NotFound));
        return;
    }
    if let Some(waiters) = state.check_waiters.get_mut(&id) {
        waiters.replies.push(reply);
        return;
    }
    let Some(monitor) = state.monitors.get(&id) else {
        // Between a monitor's failure and its restart there is nobody to check; the restart
        // checks soon enough, and the client hears what is known now.
        let _ = reply.send(state.view_of(id).ok_or(RegistryError::NotFound));
        return;
    };
    if monitor
        .actor
        .cast(MonitorMsg::CheckNow(Instant::now()))
        .is_err()
    {
        let _ = reply.send(Err(RegistryError::NotFound));
        return;
    }
    state.next_check_round += 1;
    let round = state.next_check_round;
    state.check_waiters.insert(
        id,
        CheckWaiters {
            replies: vec![reply],
            round,
        },
    );
    // A monitor busy with member maintenance takes longer; the client hears within the
    // check deadline all the same.
    let deadline = state.settings.monitor.check_deadline();
    myself.send_after(deadline, move || RegistryMsg::CheckNowExpired(id, round));
}

/// Answers everyone waiting for a check of `id` with the cluster as it is now; with a
/// `round`, only if the waiters are still that round's.
pub(super) fn answer_check_waiters(state: &mut RegistryState, id: ClusterId, round: Option<u64>) {
    let current = state.check_waiters.get(&id).map(|w| w.round);
    if current.is_none() || round.is_some_and(|r| Some(r) != current) {
        return;
    }
    let Some(waiters) = state.check_waiters.remove(&id) else {
        return;
    };
    let view = state.view_of(id);
    for reply in waiters.replies {
        let _ = reply.send(view.clone().ok_or(RegistryError::NotFound));
    }
}
