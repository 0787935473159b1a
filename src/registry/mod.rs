//! The registry actor: the only owner of cluster state and the only writer to the store.
//!
//! It never awaits the network. A registration reserves its name, probes Proxmox in a task of
//! its own, and comes back as a message to be committed; a monitor per cluster, spawned and
//! supervised here, checks Proxmox and reports results as messages too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::task::JoinHandle;

use crate::cluster::{CheckOutcome, Cluster, ClusterView, Transition};
use crate::domain::{ClusterId, ClusterName, ClusterStatus, Credentials, Endpoint, StatusReason};
use crate::events::{EventHub, EventKind, Subscription};
use crate::monitor::{MonitorActor, MonitorArgs, MonitorMsg, MonitorSettings};
use crate::proxmox::members::{self, ChannelTrust, Member, MemberReport};
use crate::proxmox::{ProbeReport, ProxmoxClient, ProxmoxError, Session};
use crate::secrets::{SecretsError, Vault};
use crate::store::{ClusterRecord, Store, StoreError};
use crate::tls::{Fingerprint, TrustAnchors};

pub mod views;

use views::{ReadCluster, ReadList, ReadModel, Rendered};

/// How often monitor results that changed something are written, in one transaction.
const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A monitor that ran this long since its last restart starts its back-off afresh.
const HEALTHY_PERIOD: Duration = Duration::from_secs(120);
/// A status older than this many intervals (plus the longest a check may take) shows as
/// unknown.
const STALE_AFTER_INTERVALS: u32 = 3;

/// How often shown statuses are re-checked for staleness; a stale status shows within this.
const STALE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Identifies one registration attempt, so a client that goes away can cancel it.
pub type RegistrationId = uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("a cluster with this name already exists")]
    Conflict,
    #[error("cluster not found")]
    NotFound,
    #[error(transparent)]
    Proxmox(#[from] ProxmoxError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("a background task failed: {0}")]
    Task(String),
}

/// A validated registration request.
#[derive(Debug)]
pub struct NewCluster {
    pub name: ClusterName,
    pub endpoint: Endpoint,
    pub fingerprint: Option<Fingerprint>,
    pub credentials: Credentials,
}

#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub monitor: MonitorSettings,
    pub failure_threshold: u32,
}

pub enum RegistryMsg {
    Register(
        RegistrationId,
        NewCluster,
        RpcReplyPort<Result<ClusterView, RegistryError>>,
    ),
    CancelRegistration(RegistrationId),
    ProbeFinished(RegistrationId, Result<ProbeReport, ProxmoxError>),
    /// The rendered list and a way to wait for its next change.
    ReadList(RpcReplyPort<ReadList>),
    /// One rendered cluster and a way to wait for its next change; `None` when unknown.
    ReadCluster(ClusterId, RpcReplyPort<Option<ReadCluster>>),
    /// One cluster's rendered history; `None` when unknown.
    ReadHistory(ClusterId, RpcReplyPort<Option<Rendered>>),
    /// One cluster's view; `None` when unknown.
    Get(ClusterId, RpcReplyPort<Option<ClusterView>>),
    Delete(ClusterId, RpcReplyPort<Result<(), RegistryError>>),
    /// Answers with the number of clusters, proof the registry is alive, or why it is not
    /// healthy: the last write to the database failed.
    Ping(RpcReplyPort<Result<usize, String>>),
    /// Subscribes to change events, replaying those after the given event id.
    Subscribe(Option<u64>, RpcReplyPort<Subscription>),
    /// Figures for `/metrics` and systemd's status line.
    Snapshot(RpcReplyPort<Vec<ClusterSnapshot>>),
    CheckCompleted {
        cluster: ClusterId,
        generation: u64,
        outcome: CheckOutcome,
        members: MemberReport,
    },
    /// A monitor learned something about the members between checks (a discovery, a probe,
    /// an adopted pin).
    MembersChanged {
        cluster: ClusterId,
        generation: u64,
        members: MemberReport,
    },
    RestartMonitor(ClusterId),
    Flush,
    /// Re-renders clusters whose shown status turned stale (or back) since the last sweep.
    SweepStale,
    /// Test access to a cluster's current monitor.
    #[cfg(test)]
    MonitorOf(ClusterId, RpcReplyPort<Option<ActorRef<MonitorMsg>>>),
}

pub struct RegistryActor;

/// One cluster's figures at one moment.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    pub view: ClusterView,
    pub seconds_since_success: Option<f64>,
}

pub struct RegistryArgs {
    pub store: Store,
    pub vault: Arc<Vault>,
    pub clusters: Vec<Cluster>,
    pub settings: RegistrySettings,
    pub trust: TrustAnchors,
}

struct PendingRegistration {
    name: ClusterName,
    request: NewCluster,
    reply: RpcReplyPort<Result<ClusterView, RegistryError>>,
    probe: JoinHandle<()>,
}

struct MonitorHandle {
    actor: ActorRef<MonitorMsg>,
    generation: u64,
}

#[derive(Debug, Clone, Copy)]
struct RestartBackoff {
    delay: Duration,
    last_restart: Instant,
}

pub struct RegistryState {
    store: Store,
    vault: Arc<Vault>,
    settings: RegistrySettings,
    trust: TrustAnchors,
    clusters: BTreeMap<ClusterId, Cluster>,
    pending: HashMap<RegistrationId, PendingRegistration>,
    monitors: HashMap<ClusterId, MonitorHandle>,
    monitor_owners: HashMap<ActorId, ClusterId>,
    restarts: HashMap<ClusterId, RestartBackoff>,
    next_generation: u64,
    dirty: HashSet<ClusterId>,
    /// Of the dirty clusters, those with a new status transition.
    history_dirty: HashSet<ClusterId>,
    events: EventHub,
    /// What GET answers, rendered ahead of time.
    views: ReadModel,
    /// Clusters last rendered as stale.
    stale_shown: HashSet<ClusterId>,
    /// The newest failed write, until a write succeeds; reported by `/health` and withheld
    /// watchdog pings, so a broken disk does not go unnoticed.
    store_error: Option<String>,
}

impl RegistryState {
    /// A monitor waiting on a slow Proxmox is not stuck: the window allows for a whole check.
    fn stale_after(&self) -> Duration {
        self.settings.monitor.interval * STALE_AFTER_INTERVALS
            + self.settings.monitor.check_deadline()
    }

    fn name_taken(&self, name: &ClusterName) -> bool {
        self.clusters.values().any(|c| &c.record.name == name)
            || self.pending.values().any(|p| &p.name == name)
    }
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RegistryArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RegistryState {
            store: args.store,
            vault: args.vault,
            settings: args.settings,
            trust: args.trust,
            clusters: args.clusters.into_iter().map(|c| (c.id(), c)).collect(),
            pending: HashMap::new(),
            monitors: HashMap::new(),
            monitor_owners: HashMap::new(),
            restarts: HashMap::new(),
            next_generation: 0,
            dirty: HashSet::new(),
            history_dirty: HashSet::new(),
            events: EventHub::new(),
            views: ReadModel::new(),
            stale_shown: HashSet::new(),
            store_error: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ids: Vec<ClusterId> = state.clusters.keys().copied().collect();
        for id in &ids {
            render(state, *id, true);
        }
        for id in ids {
            spawn_monitor(&myself, state, id, None).await;
        }
        myself.send_interval(FLUSH_INTERVAL, || RegistryMsg::Flush);
        myself.send_interval(STALE_SWEEP_INTERVAL, || RegistryMsg::SweepStale);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Register(id, request, reply) => {
                on_register(&myself, state, id, request, reply)
            }
            RegistryMsg::CancelRegistration(id) => {
                if let Some(pending) = state.pending.remove(&id) {
                    pending.probe.abort();
                    tracing::debug!(cluster = %pending.name, "registration abandoned by its client");
                }
            }
            RegistryMsg::ProbeFinished(id, result) => {
                on_probe_finished(&myself, state, id, result).await;
            }
            RegistryMsg::ReadList(reply) => {
                let _ = reply.send(state.views.list());
            }
            RegistryMsg::ReadCluster(id, reply) => {
                let _ = reply.send(state.views.cluster(id));
            }
            RegistryMsg::ReadHistory(id, reply) => {
                let _ = reply.send(state.views.history(id));
            }
            RegistryMsg::Get(id, reply) => {
                let stale_after = state.stale_after();
                let _ = reply.send(state.clusters.get(&id).map(|c| c.view(stale_after)));
            }
            RegistryMsg::Delete(id, reply) => {
                let result = on_delete(state, id).await;
                let _ = reply.send(result);
            }
            RegistryMsg::Ping(reply) => {
                let health = match &state.store_error {
                    None => Ok(state.clusters.len()),
                    Some(error) => Err(format!("database writes are failing: {error}")),
                };
                let _ = reply.send(health);
            }
            RegistryMsg::Subscribe(last_event_id, reply) => {
                let _ = reply.send(state.events.subscribe(last_event_id));
            }
            RegistryMsg::Snapshot(reply) => {
                let stale_after = state.stale_after();
                let snapshot = state
                    .clusters
                    .values()
                    .map(|c| ClusterSnapshot {
                        view: c.view(stale_after),
                        seconds_since_success: c.seconds_since_success(),
                    })
                    .collect();
                let _ = reply.send(snapshot);
            }
            RegistryMsg::CheckCompleted {
                cluster,
                generation,
                outcome,
                members,
            } => on_check_completed(state, cluster, generation, Some(outcome), members),
            RegistryMsg::MembersChanged {
                cluster,
                generation,
                members,
            } => on_check_completed(state, cluster, generation, None, members),
            RegistryMsg::RestartMonitor(id) => {
                if state.clusters.contains_key(&id) && !state.monitors.contains_key(&id) {
                    spawn_monitor(&myself, state, id, None).await;
                }
            }
            RegistryMsg::Flush => flush(state).await,
            RegistryMsg::SweepStale => sweep_stale(state),
            #[cfg(test)]
            RegistryMsg::MonitorOf(id, reply) => {
                let _ = reply.send(state.monitors.get(&id).map(|m| m.actor.clone()));
            }
        }
        Ok(())
    }

    // The default handler stops the registry whenever a monitor ends; a monitor's bug must
    // never take the registry, or any other monitor, down with it.
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_owned()))
            }
            _ => return Ok(()),
        };
        // Monitors we killed ourselves (deleted clusters) were forgotten already.
        let Some(id) = state.monitor_owners.remove(&cell.get_id()) else {
            return Ok(());
        };
        state.monitors.remove(&id);
        if !state.clusters.contains_key(&id) {
            return Ok(());
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
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for (_, pending) in state.pending.drain() {
            pending.probe.abort();
        }
        for (_, monitor) in state.monitors.drain() {
            monitor.actor.kill();
        }
        state.monitor_owners.clear();
        flush(state).await;
        Ok(())
    }
}

fn on_register(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: RegistrationId,
    request: NewCluster,
    reply: RpcReplyPort<Result<ClusterView, RegistryError>>,
) {
    if state.name_taken(&request.name) {
        let _ = reply.send(Err(RegistryError::Conflict));
        return;
    }
    let client = match ProxmoxClient::new(
        request.endpoint.clone(),
        state.settings.monitor.proxmox_timeout,
        &state.trust,
        request.fingerprint,
    ) {
        Ok(client) => client,
        Err(e) => {
            let _ = reply.send(Err(e.into()));
            return;
        }
    };
    let credentials = request.credentials.clone();
    let registry = myself.clone();
    // The same budget as a monitor's check, so the caller's wait (a little longer) never
    // expires first and a slow Proxmox reads as a timeout, not as an unresponsive registry.
    let deadline = state.settings.monitor.check_deadline();
    let discover = state.settings.monitor.members.discovery;
    let probe = tokio::spawn(async move {
        let result = tokio::time::timeout(deadline, client.probe(&credentials, discover))
            .await
            .unwrap_or(Err(ProxmoxError::Timeout(deadline)));
        let _ = registry.cast(RegistryMsg::ProbeFinished(id, result));
    });
    state.pending.insert(
        id,
        PendingRegistration {
            name: request.name.clone(),
            request,
            reply,
            probe,
        },
    );
}

async fn on_probe_finished(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: RegistrationId,
    result: Result<ProbeReport, ProxmoxError>,
) {
    let Some(pending) = state.pending.remove(&id) else {
        return;
    };
    if pending.reply.is_closed() {
        return;
    }
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            tracing::info!(cluster = %pending.name, endpoint = %pending.request.endpoint, error = %e, "registration refused by the Proxmox probe");
            let _ = pending.reply.send(Err(e.into()));
            return;
        }
    };
    let result = commit_registration(myself, state, pending.request, report).await;
    let _ = pending.reply.send(result);
}

async fn commit_registration(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    request: NewCluster,
    report: ProbeReport,
) -> Result<ClusterView, RegistryError> {
    let id = ClusterId::now_v7();
    let now = Utc::now();
    let credential = state
        .vault
        .seal(request.credentials.secret(), id.as_bytes())?;
    let (status, status_reason) = crate::cluster::assess(&report.status.health);
    let members = registration_members(state, &request, &report);
    let active_endpoint = Some(request.endpoint.clone());
    let record = ClusterRecord {
        format: ClusterRecord::FORMAT,
        id,
        name: request.name,
        api_endpoint: request.endpoint,
        username: request.credentials.username().clone(),
        auth_method: request.credentials.method(),
        token_id: request.credentials.token_id().cloned(),
        credential,
        fingerprint: request.fingerprint,
        proxmox_version: report.version,
        node_count: report.status.health.node_count,
        nodes_online: report.status.health.nodes_online,
        quorate: report.status.health.quorate,
        status,
        status_reason,
        last_error: None,
        last_checked_at: Some(now),
        created_at: now,
        updated_at: now,
        members,
        active_endpoint,
    };
    let cluster = Cluster::registered(record, request.credentials);
    let to_write = [(cluster.record.clone(), Some(cluster.history()))];
    write(state, move |store| store.put(&to_write)).await?;
    let view = cluster.view(state.stale_after());
    tracing::info!(cluster = %view.name, cluster_id = %id, endpoint = %view.api_endpoint, status = %view.status, "cluster registered");
    state.clusters.insert(id, cluster);
    render(state, id, true);
    publish(state, EventKind::Registered, &view);
    spawn_monitor(myself, state, id, Some(report.session)).await;
    Ok(view)
}

async fn on_delete(state: &mut RegistryState, id: ClusterId) -> Result<(), RegistryError> {
    if !state.clusters.contains_key(&id) {
        return Err(RegistryError::NotFound);
    }
    write(state, move |store| store.delete(id)).await?;
    // Forget the monitor before killing it, so its termination is not taken for a failure.
    if let Some(monitor) = state.monitors.remove(&id) {
        state.monitor_owners.remove(&monitor.actor.get_id());
        monitor.actor.kill();
    }
    state.restarts.remove(&id);
    state.dirty.remove(&id);
    state.history_dirty.remove(&id);
    state.views.remove(id);
    state.stale_shown.remove(&id);
    if let Some(cluster) = state.clusters.remove(&id) {
        tracing::info!(cluster = %cluster.record.name, cluster_id = %id, "cluster deregistered");
    }
    state
        .events
        .publish(EventKind::Deregistered, serde_json::json!({ "id": id }));
    Ok(())
}

fn on_check_completed(
    state: &mut RegistryState,
    id: ClusterId,
    generation: u64,
    outcome: Option<CheckOutcome>,
    members: MemberReport,
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
    let members_effect = cluster.apply_members(members, now);
    let history_changed = effect.history_changed || members_effect.history_changed;
    if history_changed {
        state.history_dirty.insert(id);
    }
    if effect.changed || members_effect.changed {
        let view = cluster.view(stale_after);
        state.dirty.insert(id);
        publish(state, EventKind::Updated, &view);
    }
    // `last_checked_at` moved at least, so the body is re-rendered (its tag only if more did).
    render(state, id, history_changed);
}

/// Re-renders one cluster's representation, and its history when that changed.
fn render(state: &mut RegistryState, id: ClusterId, with_history: bool) {
    let stale_after = state.stale_after();
    let Some(cluster) = state.clusters.get(&id) else {
        return;
    };
    let view = cluster.view(stale_after);
    if view.status_reason == StatusReason::Stale {
        state.stale_shown.insert(id);
    } else {
        state.stale_shown.remove(&id);
    }
    state.views.put_cluster(&view, cluster.record.created_at);
    if with_history {
        state.views.put_history(id, &cluster.history_newest_first());
    }
}

/// A status is shown `unknown` once its newest check is too old: render that when it
/// happens, not per request.
fn sweep_stale(state: &mut RegistryState) {
    let stale_after = state.stale_after();
    let flipped: Vec<ClusterId> = state
        .clusters
        .values()
        .filter(|c| c.is_stale(stale_after) != state.stale_shown.contains(&c.id()))
        .map(Cluster::id)
        .collect();
    for id in flipped {
        render(state, id, false);
    }
}

/// The members a registration starts with: the discovered ones under the registration's
/// trust, or what `/cluster/status` lists when discovery is off.
fn registration_members(
    state: &RegistryState,
    request: &NewCluster,
    report: &ProbeReport,
) -> Vec<Member> {
    let local = report
        .status
        .local_node()
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let start = vec![Member::registered(&local, &request.endpoint)];
    let policy = &state.settings.monitor.members;
    let trust = ChannelTrust::of(
        &request.endpoint,
        request.fingerprint,
        state.trust.insecure_skip_verify(),
    );
    let mut list = match &report.discovery {
        Some(discovery) => members::merge(&start, discovery, &request.endpoint, trust),
        None => members::from_status(&start, &report.status, &request.endpoint),
    };
    members::apply_online(&mut list, &report.status);
    for member in &mut list {
        if member.registered {
            member.reachable = Some(true);
        }
    }
    members::note_refusals(&mut list, policy, trust);
    list.retain(|m| !m.name.is_empty());
    list
}

fn publish(state: &mut RegistryState, kind: EventKind, view: &ClusterView) {
    match serde_json::to_value(view) {
        Ok(data) => state.events.publish(kind, data),
        Err(e) => tracing::error!(error = %e, "cannot encode a cluster event"),
    }
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

/// Writes every changed cluster in one durable transaction, so a burst of status changes
/// costs one fsync, not one per cluster.
async fn flush(state: &mut RegistryState) {
    if state.dirty.is_empty() {
        return;
    }
    let records: Vec<(ClusterRecord, Option<Vec<Transition>>)> = state
        .dirty
        .iter()
        .filter_map(|id| state.clusters.get(id))
        .map(|c| {
            let history = state.history_dirty.contains(&c.id()).then(|| c.history());
            (c.record.clone(), history)
        })
        .collect();
    match write(state, move |store| store.put(&records)).await {
        Ok(()) => {
            state.dirty.clear();
            state.history_dirty.clear();
        }
        Err(e) => tracing::error!(error = %e, "cannot persist monitor results; will retry"),
    }
}

/// Runs a store write on a blocking thread (redb fsyncs) and records whether the database
/// still takes writes.
async fn write<T: Send + 'static>(
    state: &mut RegistryState,
    operation: impl FnOnce(Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, RegistryError> {
    let store = state.store.clone();
    let result = match tokio::task::spawn_blocking(move || operation(store)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(RegistryError::Store(e)),
        Err(e) => Err(RegistryError::Task(e.to_string())),
    };
    state.store_error = result.as_ref().err().map(ToString::to_string);
    result
}

async fn spawn_monitor(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    session: Option<Session>,
) {
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
        session,
        settings: state.settings.monitor.clone(),
        registry: myself.clone(),
    };
    match Actor::spawn_linked(None, MonitorActor, args, myself.get_cell()).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ProxmoxUser, Secret};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A "Proxmox" that accepts connections and hangs up: every check fails, but each one
    /// shows up as a connection.
    fn hang_up_server() -> (String, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        (url, connections)
    }

    async fn wait_until<F: FnMut() -> bool>(mut condition: F, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_failed_monitor_is_restarted_and_keeps_checking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db.redb")).expect("store");
        let vault = Vault::create(&dir.path().join("key")).expect("key");
        let (url, connections) = hang_up_server();
        let id = ClusterId::now_v7();
        let now = Utc::now();
        let record = ClusterRecord {
            format: ClusterRecord::FORMAT,
            id,
            name: ClusterName::parse("lab").expect("name"),
            api_endpoint: Endpoint::parse(&url).expect("endpoint"),
            username: ProxmoxUser::parse("root@pam").expect("user"),
            auth_method: crate::domain::AuthMethod::Password,
            token_id: None,
            credential: vault.seal(&Secret::new("pw"), id.as_bytes()).expect("seal"),
            fingerprint: None,
            proxmox_version: "8.4.1".into(),
            node_count: 1,
            nodes_online: 1,
            quorate: None,
            status: ClusterStatus::Healthy,
            status_reason: StatusReason::Ok,
            last_error: None,
            last_checked_at: None,
            created_at: now,
            updated_at: now,
            members: Vec::new(),
            active_endpoint: None,
        };
        let credentials = Credentials::Password {
            username: record.username.clone(),
            password: Secret::new("pw"),
        };
        let (registry, task) = Actor::spawn(
            None,
            RegistryActor,
            RegistryArgs {
                store,
                vault: Arc::new(vault),
                clusters: vec![Cluster::loaded(record, credentials, Vec::new())],
                settings: RegistrySettings {
                    monitor: MonitorSettings {
                        interval: Duration::from_millis(50),
                        proxmox_timeout: Duration::from_secs(1),
                        members: crate::proxmox::members::MemberPolicy::default(),
                    },
                    failure_threshold: 3,
                },
                trust: TrustAnchors::load(None, false).expect("trust anchors"),
            },
        )
        .await
        .expect("registry starts");

        let monitor_of = || async {
            ractor::call!(registry, RegistryMsg::MonitorOf, id).expect("registry answers")
        };
        let first = monitor_of().await.expect("a monitor runs");
        wait_until(|| connections.load(Ordering::SeqCst) >= 2, "first checks").await;

        first
            .cast(MonitorMsg::Crash)
            .expect("monitor takes messages");
        let mut replacement = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        while replacement.is_none() {
            assert!(Instant::now() < deadline, "monitor was not restarted");
            tokio::time::sleep(Duration::from_millis(20)).await;
            replacement = monitor_of().await.filter(|m| m.get_id() != first.get_id());
        }
        let after_restart = connections.load(Ordering::SeqCst);
        wait_until(
            || connections.load(Ordering::SeqCst) >= after_restart + 2,
            "checks by the restarted monitor",
        )
        .await;

        let view = ractor::call!(registry, RegistryMsg::Get, id)
            .expect("registry answers")
            .expect("cluster still registered");
        assert_eq!(view.status, ClusterStatus::Unhealthy);
        assert_eq!(view.status_reason, StatusReason::Unreachable);

        registry.stop(None);
        task.await.expect("registry stops cleanly");
    }
}
