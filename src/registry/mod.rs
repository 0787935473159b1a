//! The registry actor: the only owner of cluster state and the only writer to the store.
//!
//! It never awaits the network or the disk. A registration reserves its name, probes Proxmox
//! in a task of its own, and comes back as a message to be stored; commits run on the store
//! writer and come back as messages too; a monitor per cluster, spawned and supervised here,
//! checks Proxmox and reports results as messages.
//!
//! - [`registration`]: reserve, probe, store, go live.
//! - [`supervision`]: monitors' lifecycle and their reports.
//! - [`writer`]: the store writer (group commit, retries, health).
//! - [`views`]: what GET answers, rendered ahead of time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::cluster::{CheckOutcome, Cluster, ClusterView};
use crate::domain::{ClusterId, ClusterName, Credentials, Endpoint, StatusReason, ValidationError};
use crate::events::{EventHub, EventKind, Subscription};
use crate::leadership::{Leadership, Role};
#[cfg(test)]
use crate::monitor::MonitorMsg;
use crate::monitor::MonitorSettings;
use crate::proxmox::members::MemberReport;
use crate::proxmox::{ProbeReport, ProxmoxError, ProxmoxRuntime};
use crate::secrets::{SecretsError, Vault};
use crate::store::{RemoteChange, Store, StoreError, WriteBatch};
use crate::tls::{Fingerprint, TrustAnchors};

mod registration;
pub(crate) mod replication;
mod settings;
mod staleness;
mod supervision;
/// What GET answers, rendered ahead of time.
pub mod views;
/// The store writer.
pub mod writer;

use registration::{PendingRegistration, StoringRegistration};
pub use settings::ClusterPatch;
use settings::PatchQueue;
use supervision::{MonitorHandle, RestartBackoff, spawn_monitor};
use views::{ListSnapshot, ReadCluster, ReadList, ReadModel, Rendered};
use writer::Writer;

/// How often monitor results that changed something are written to redb, in one transaction.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// With etcd, followers see a change only once it is written: sooner, still batched.
pub const SHARED_FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Changed clusters one registry message hands to the writer: about 0.3 ms of work, so reads
/// never wait long behind a flush.
const FLUSH_TURN: usize = 256;
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(60);
/// A monitor that ran this long since its last restart starts its back-off afresh.
const HEALTHY_PERIOD: Duration = Duration::from_secs(120);
/// A status older than this many intervals (plus the longest a check may take) shows as
/// unknown.
const STALE_AFTER_INTERVALS: u32 = 3;

/// How long stopping waits for the last write.
const FINAL_SYNC_LIMIT: Duration = Duration::from_secs(10);

/// How often shown statuses are re-checked for staleness; a stale status shows within this.
const STALE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Identifies one registration attempt, so a client that goes away can cancel it.
pub type RegistrationId = uuid::Uuid;

/// Why the registry refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The name is taken by another cluster or a registration in progress.
    #[error("a cluster with this name already exists")]
    Conflict,
    /// No cluster has this id.
    #[error("cluster not found")]
    NotFound,
    /// Proxmox refused the registration or could not be reached.
    #[error(transparent)]
    Proxmox(#[from] ProxmoxError),
    /// The change could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The credentials could not be sealed.
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    /// A change would leave settings a registration would refuse.
    #[error("{}: {}", .0.message, .0.reason)]
    Invalid(ValidationError),
}

/// A validated registration request.
#[derive(Debug)]
pub struct NewCluster {
    pub name: ClusterName,
    pub endpoint: Endpoint,
    pub fingerprint: Option<Fingerprint>,
    pub credentials: Credentials,
}

/// How the registry runs its monitors and judges their results.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Handed to every monitor.
    pub monitor: MonitorSettings,
    /// Failures in a row before a cluster is unhealthy.
    pub failure_threshold: u32,
    /// How often changed monitor results are written, in one batch.
    pub flush_interval: Duration,
}

/// What the registry is asked to do; replies go through the last field.
pub enum RegistryMsg {
    /// Register a validated cluster: reserve its name, probe Proxmox, store it.
    Register(
        RegistrationId,
        NewCluster,
        RpcReplyPort<Result<ClusterView, RegistryError>>,
    ),
    /// The client of a registration went away: drop its reservation and probe.
    CancelRegistration(RegistrationId),
    /// A registration's Proxmox probe is done.
    ProbeFinished(RegistrationId, Result<ProbeReport, ProxmoxError>),
    /// The rendered list and a way to wait for its next change.
    ReadList(RpcReplyPort<ReadList>),
    /// One rendered cluster and a way to wait for its next change; `None` when unknown.
    ReadCluster(ClusterId, RpcReplyPort<Option<ReadCluster>>),
    /// One cluster's rendered history; `None` when unknown.
    ReadHistory(ClusterId, RpcReplyPort<Option<Rendered>>),
    /// One cluster's view; `None` when unknown.
    Get(ClusterId, RpcReplyPort<Option<ClusterView>>),
    /// Deregister a cluster, durably.
    Delete(ClusterId, RpcReplyPort<Result<(), RegistryError>>),
    /// Change a cluster's settings: verify them with Proxmox when they affect the
    /// connection, store them durably, restart the monitor on them.
    Patch(
        ClusterId,
        ClusterPatch,
        RpcReplyPort<Result<ClusterView, RegistryError>>,
    ),
    /// Proxmox answered the verification of a cluster's changed settings.
    PatchProbed(ClusterId, Result<ProbeReport, ProxmoxError>),
    /// The writer is done with a cluster's changed settings.
    PatchStored(ClusterId, Result<(), StoreError>),
    /// Run a check now and answer with the cluster after it; requests that overlap share it.
    CheckNow(ClusterId, RpcReplyPort<Result<ClusterView, RegistryError>>),
    /// A monitor reported the check asked for.
    CheckNowDone(ClusterId),
    /// The check asked for (in the given round) is past its deadline: answer with what is
    /// known.
    CheckNowExpired(ClusterId, u64),
    /// Answers with the number of clusters and the leadership, proof the registry is alive,
    /// or why it is not healthy: the last write failed, or the shared store is unreachable.
    Ping(RpcReplyPort<HealthReport>),
    /// The election changed this instance's part or the leader it follows.
    Leadership(Leadership),
    /// Changes stored by other instances (and echoes of our own); with `full`, everything
    /// stored, after the watch had to start over.
    Remote {
        /// Whether `changes` is the whole registry.
        full: bool,
        /// The changes, oldest first.
        changes: Vec<RemoteChange>,
    },
    /// Subscribes to change events, replaying those after the given event id.
    Subscribe(Option<u64>, RpcReplyPort<Subscription>),
    /// The list as rendered, whose [`ListSnapshot::figures`] feed `/metrics` and systemd's
    /// status line: taking it is a pointer copy, and the figures are read outside the registry.
    Snapshot(RpcReplyPort<Arc<ListSnapshot>>),
    /// A monitor's check is done.
    CheckCompleted {
        cluster: ClusterId,
        generation: u64,
        outcome: CheckOutcome,
        /// The members, when anything about them changed.
        members: Option<MemberReport>,
    },
    /// A monitor learned something about the members between checks (a discovery, a probe,
    /// an adopted pin).
    MembersChanged {
        cluster: ClusterId,
        generation: u64,
        members: MemberReport,
    },
    /// Restart a cluster's monitor after its back-off.
    RestartMonitor(ClusterId),
    /// Hand changed clusters to the writer.
    Flush,
    /// The writer is done with a registration.
    RegistrationStored(RegistrationId, Result<(), StoreError>),
    /// The writer is done with a deletion.
    DeletionStored(ClusterId, Result<(), StoreError>),
    /// Re-renders clusters whose shown status turned stale (or back) since the last sweep.
    SweepStale,
    /// Test access to a cluster's current monitor.
    #[cfg(test)]
    MonitorOf(ClusterId, RpcReplyPort<Option<ActorRef<MonitorMsg>>>),
}

/// What `/health` reports of a registry that answers.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// Registered clusters.
    pub clusters: usize,
    /// This instance's part.
    pub role: Role,
    /// The leading instance's id, when one is known.
    pub leader: Option<String>,
    /// Why the registry is not healthy, if it is not.
    pub problem: Option<HealthProblem>,
}

/// Why `/health` answers 503.
#[derive(Debug, Clone)]
pub enum HealthProblem {
    /// Writes to this instance's own database fail: a restart may help.
    LocalWrites(String),
    /// The shared store (etcd) cannot be reached or written; every instance sees this, and
    /// restarting them would not help.
    SharedStore(String),
}

impl HealthProblem {
    /// The reason, for the 503's details and the log.
    pub fn reason(&self) -> &str {
        match self {
            Self::LocalWrites(reason) | Self::SharedStore(reason) => reason,
        }
    }
}

/// The registry actor; its state is [`RegistryState`].
pub struct RegistryActor;

/// One cluster's figures at one moment.
#[derive(Debug, Clone)]
pub struct ClusterSnapshot {
    /// The cluster as the API shows it.
    pub view: Arc<ClusterView>,
    /// Since Proxmox last answered a check, if it has since the daemon started.
    pub seconds_since_success: Option<f64>,
}

/// What the registry starts with.
pub struct RegistryArgs {
    /// The opened database; the registry hands it to its writer.
    pub store: Store,
    /// Seals new credentials.
    pub vault: Arc<Vault>,
    /// The clusters loaded from the database.
    pub clusters: Vec<Cluster>,
    /// Monitor and status settings.
    pub settings: RegistrySettings,
    /// TLS trust for Proxmox.
    pub trust: TrustAnchors,
    /// Where monitors run.
    pub proxmox: ProxmoxRuntime,
    /// Standalone with redb; with etcd, undecided until the election reports.
    pub leadership: Leadership,
}

/// The registry's state; only its own handlers touch it.
pub struct RegistryState {
    /// The storage, for reloads; only the writer writes to it.
    store: Store,
    writer: Writer,
    vault: Arc<Vault>,
    settings: RegistrySettings,
    trust: TrustAnchors,
    proxmox: ProxmoxRuntime,
    clusters: BTreeMap<ClusterId, Cluster>,
    /// The names of `clusters`, so a registration's uniqueness check does not scan them all.
    names: HashSet<ClusterName>,
    pending: HashMap<RegistrationId, PendingRegistration>,
    storing: HashMap<RegistrationId, StoringRegistration>,
    /// Deletions the writer is storing, with every client waiting on them.
    deleting: HashMap<ClusterId, Vec<RpcReplyPort<Result<(), RegistryError>>>>,
    monitors: HashMap<ClusterId, MonitorHandle>,
    monitor_owners: HashMap<ActorId, ClusterId>,
    restarts: HashMap<ClusterId, RestartBackoff>,
    next_generation: u64,
    /// Clusters whose record or history changed since the last flush.
    dirty: HashSet<ClusterId>,
    /// Changed clusters the flush under way cannot write yet; dirty again once it is over.
    flush_held: HashSet<ClusterId>,
    events: EventHub,
    /// What GET answers, rendered ahead of time.
    views: ReadModel,
    /// Clusters last rendered as stale.
    stale_shown: HashSet<ClusterId>,
    /// When the others go stale, while this instance runs the monitors.
    stale_deadlines: staleness::StaleDeadlines,
    /// Settings changes per cluster, waiting or under way.
    patches: HashMap<ClusterId, PatchQueue>,
    /// Clients waiting for a check they asked for.
    check_waiters: HashMap<ClusterId, supervision::CheckWaiters>,
    /// Tells one round of asked-for checks from the next.
    next_check_round: u64,
    /// This instance's part among instances sharing a store.
    leadership: Leadership,
}

impl RegistryState {
    /// A monitor waiting on a slow Proxmox is not stuck: the window allows for a whole check.
    fn stale_after(&self) -> Duration {
        self.settings.monitor.interval * STALE_AFTER_INTERVALS
            + self.settings.monitor.longest_silence()
    }

    /// One cluster as the API shows it now.
    fn view_of(&self, id: ClusterId) -> Option<ClusterView> {
        let stale_after = self.stale_after();
        self.clusters.get(&id).map(|c| c.view(stale_after))
    }

    fn name_taken(&self, name: &ClusterName) -> bool {
        self.names.contains(name)
            || self.name_claimed_by_a_change(name)
            || self.pending.values().any(|p| &p.name == name)
            || self
                .storing
                .values()
                .any(|s| &s.cluster.record.name == name)
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
            writer: Writer::spawn(args.store.clone()),
            store: args.store,
            vault: args.vault,
            settings: args.settings,
            trust: args.trust,
            proxmox: args.proxmox,
            names: args
                .clusters
                .iter()
                .map(|c| c.record.name.clone())
                .collect(),
            clusters: args.clusters.into_iter().map(|c| (c.id(), c)).collect(),
            pending: HashMap::new(),
            storing: HashMap::new(),
            deleting: HashMap::new(),
            monitors: HashMap::new(),
            monitor_owners: HashMap::new(),
            restarts: HashMap::new(),
            next_generation: 0,
            dirty: HashSet::new(),
            flush_held: HashSet::new(),
            events: EventHub::new(),
            views: ReadModel::new(),
            stale_shown: HashSet::new(),
            stale_deadlines: staleness::StaleDeadlines::default(),
            patches: HashMap::new(),
            check_waiters: HashMap::new(),
            next_check_round: 0,
            leadership: args.leadership,
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
            // The restart is a transition of its own, still to be stored.
            if state
                .clusters
                .get(id)
                .is_some_and(Cluster::has_unstored_history)
            {
                state.dirty.insert(*id);
            }
        }
        if state.leadership.role.runs_monitors() {
            for id in ids {
                spawn_monitor(&myself, state, id, None, false);
            }
        }
        myself.send_interval(state.settings.flush_interval, || RegistryMsg::Flush);
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
                registration::on_register(&myself, state, id, request, reply)
            }
            RegistryMsg::CancelRegistration(id) => {
                if let Some(pending) = state.pending.remove(&id) {
                    pending.probe.abort();
                    tracing::debug!(cluster = %pending.name, "registration abandoned by its client");
                }
            }
            RegistryMsg::ProbeFinished(id, result) => {
                registration::on_probe_finished(&myself, state, id, result);
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
                let _ = reply.send(state.view_of(id));
            }
            RegistryMsg::Delete(id, reply) => on_delete(&myself, state, id, reply),
            RegistryMsg::Patch(id, patch, reply) => {
                settings::on_patch(&myself, state, id, patch, reply);
            }
            RegistryMsg::PatchProbed(id, result) => {
                settings::on_patch_probed(&myself, state, id, result);
            }
            RegistryMsg::PatchStored(id, result) => {
                settings::on_patch_stored(&myself, state, id, result);
            }
            RegistryMsg::CheckNow(id, reply) => {
                supervision::on_check_now(&myself, state, id, reply);
            }
            RegistryMsg::CheckNowDone(id) => supervision::answer_check_waiters(state, id, None),
            RegistryMsg::CheckNowExpired(id, round) => {
                supervision::answer_check_waiters(state, id, Some(round));
            }
            RegistryMsg::Ping(reply) => {
                let shared = state.leadership.role != Role::Standalone;
                let problem = match (&state.leadership.storage_error, state.writer.failure()) {
                    (Some(error), _) => Some(HealthProblem::SharedStore(error.clone())),
                    (None, Some(error)) if shared => Some(HealthProblem::SharedStore(format!(
                        "storage unavailable: {error}"
                    ))),
                    (None, Some(error)) => Some(HealthProblem::LocalWrites(format!(
                        "database writes are failing: {error}"
                    ))),
                    (None, None) => None,
                };
                let _ = reply.send(HealthReport {
                    clusters: state.clusters.len(),
                    role: state.leadership.role,
                    leader: state.leadership.leader.clone(),
                    problem,
                });
            }
            RegistryMsg::Leadership(leadership) => {
                replication::on_leadership(&myself, state, leadership);
            }
            RegistryMsg::Remote { full, changes } => {
                replication::on_remote(&myself, state, full, changes);
            }
            RegistryMsg::Subscribe(last_event_id, reply) => {
                let _ = reply.send(state.events.subscribe(last_event_id));
            }
            RegistryMsg::Snapshot(reply) => {
                let _ = reply.send(state.views.list().snapshot);
            }
            RegistryMsg::CheckCompleted {
                cluster,
                generation,
                outcome,
                members,
            } => {
                supervision::on_check_completed(state, cluster, generation, Some(outcome), members)
            }
            RegistryMsg::MembersChanged {
                cluster,
                generation,
                members,
            } => supervision::on_check_completed(state, cluster, generation, None, Some(members)),
            RegistryMsg::RestartMonitor(id) => {
                if state.clusters.contains_key(&id) && !state.monitors.contains_key(&id) {
                    spawn_monitor(&myself, state, id, None, false);
                }
            }
            RegistryMsg::Flush => {
                // In turns, each behind the messages already waiting: a flush of thousands
                // of changes would otherwise hold every read for milliseconds.
                if flush(state, FLUSH_TURN) {
                    let _ = myself.cast(RegistryMsg::Flush);
                }
            }
            RegistryMsg::RegistrationStored(registration, result) => {
                registration::on_registration_stored(&myself, state, registration, result);
            }
            RegistryMsg::DeletionStored(id, result) => on_deletion_stored(state, id, result),
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
        supervision::on_monitor_ended(&myself, state, event);
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
        flush(state, usize::MAX);
        // A disk that hangs must not hold the daemon's exit forever.
        if tokio::time::timeout(FINAL_SYNC_LIMIT, state.writer.sync())
            .await
            .is_err()
        {
            tracing::error!("the last monitor results could not be written in time");
        }
        Ok(())
    }
}

/// Hands the deletion to the writer; the cluster goes only once that is durable.
fn on_delete(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    id: ClusterId,
    reply: RpcReplyPort<Result<(), RegistryError>>,
) {
    if !state.clusters.contains_key(&id) {
        let _ = reply.send(Err(RegistryError::NotFound));
        return;
    }
    if let Some(waiting) = state.deleting.get_mut(&id) {
        waiting.push(reply);
        return;
    }
    state.deleting.insert(id, vec![reply]);
    let stored = state.writer.write_durably(WriteBatch {
        deletes: vec![id],
        ..WriteBatch::default()
    });
    let registry = myself.clone();
    tokio::spawn(async move {
        let result = stored.await;
        let _ = registry.cast(RegistryMsg::DeletionStored(id, result));
    });
}

fn on_deletion_stored(state: &mut RegistryState, id: ClusterId, result: Result<(), StoreError>) {
    let waiting = state.deleting.remove(&id).unwrap_or_default();
    if let Err(e) = result {
        tracing::error!(cluster_id = %id, error = %e, "cannot store a deletion");
        for reply in waiting {
            let _ = reply.send(Err(RegistryError::Store(e.clone())));
        }
        return;
    }
    // Forget the monitor before killing it, so its termination is not taken for a failure.
    if let Some(monitor) = state.monitors.remove(&id) {
        state.monitor_owners.remove(&monitor.actor.get_id());
        monitor.actor.kill();
    }
    state.restarts.remove(&id);
    state.dirty.remove(&id);
    state.views.remove(id);
    state.stale_shown.remove(&id);
    if let Some(cluster) = state.clusters.remove(&id) {
        state.names.remove(&cluster.record.name);
        tracing::info!(cluster = %cluster.record.name, cluster_id = %id, "cluster deregistered");
    }
    state
        .events
        .publish(EventKind::Deregistered, serde_json::json!({ "id": id }));
    for reply in waiting {
        let _ = reply.send(Ok(()));
    }
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
        state.stale_deadlines.forget(id);
    } else {
        state.stale_shown.remove(&id);
        match cluster.stale_at(stale_after) {
            Some(at) => state.stale_deadlines.set(id, at),
            None => state.stale_deadlines.forget(id),
        }
    }
    state
        .views
        .put_cluster(&view, cluster.record.created_at, cluster.last_success());
    if with_history {
        state.views.put_history(id, &cluster.history_newest_first());
    }
}

/// A status is shown `unknown` once its newest check is too old: render that when it
/// happens, not per request.
fn sweep_stale(state: &mut RegistryState) {
    let stale_after = state.stale_after();
    let flipped: Vec<ClusterId> = if state.leadership.role.runs_monitors() {
        // Every check is rendered, which sets the cluster's deadline: only those past it
        // can have turned stale.
        let mut flipped = Vec::new();
        for id in state.stale_deadlines.take_due(Instant::now()) {
            let Some(cluster) = state.clusters.get(&id) else {
                continue;
            };
            if cluster.is_stale(stale_after) {
                flipped.push(id);
            } else if let Some(at) = cluster.stale_at(stale_after) {
                state.stale_deadlines.set(id, at);
            }
        }
        flipped
    } else {
        // A follower's clusters are as fresh as the leader's work on them: the leader stores
        // a stale status when it sees one. With nobody leading, they go stale as a monitor
        // would.
        let leader_at_work =
            state.leadership.leader.is_some() && state.leadership.storage_error.is_none();
        if leader_at_work {
            for cluster in state.clusters.values_mut() {
                cluster.mark_observed();
            }
        }
        state
            .clusters
            .values()
            .filter(|c| c.is_stale(stale_after) != state.stale_shown.contains(&c.id()))
            .map(Cluster::id)
            .collect()
    };
    for id in flipped {
        render(state, id, false);
        // Followers learn of it from the stored status.
        if state.leadership.role == Role::Leader {
            state.dirty.insert(id);
        }
    }
}

fn publish(state: &mut RegistryState, kind: EventKind, view: &ClusterView) {
    match serde_json::to_value(view) {
        Ok(data) => state.events.publish(kind, data),
        Err(e) => tracing::error!(error = %e, "cannot encode a cluster event"),
    }
}

/// Hands changed clusters to the writer, at most `at_most` of them, as one batch: a burst of
/// status changes costs one commit, not one per cluster (the writer merges the batches that
/// wait together). A cluster being deleted is left out: writing it after its deletion would
/// bring it back. Whether changed clusters are left for another turn.
fn flush(state: &mut RegistryState, at_most: usize) -> bool {
    if state.dirty.is_empty() {
        return false;
    }
    // A follower writes only what clients ask for, durably; status is the leader's to write.
    if state.leadership.role == Role::Follower {
        state.dirty.clear();
        state.flush_held.clear();
        return false;
    }
    let stale_after = state.stale_after();
    let mut batch = WriteBatch::default();
    let turn: Vec<ClusterId> = state.dirty.iter().take(at_most).copied().collect();
    for id in turn {
        state.dirty.remove(&id);
        // Kept for the next flush, in case the deletion fails and the cluster stays; or
        // until a settings change is stored, which this record would otherwise undo.
        if state.deleting.contains_key(&id) || state.change_being_stored(id) {
            state.flush_held.insert(id);
            continue;
        }
        if let Some(cluster) = state.clusters.get_mut(&id) {
            let mut part = writer::batch_of(cluster);
            // Followers show what is stored: a stale status is stored as shown.
            if state.leadership.role == Role::Leader
                && cluster.is_stale(stale_after)
                && let Some(record) = part.records.get_mut(&id)
            {
                record.status = crate::domain::ClusterStatus::Unknown;
                record.status_reason = StatusReason::Stale;
            }
            batch.merge(part);
        }
    }
    state.writer.write_in_background(batch);
    if state.dirty.is_empty() {
        // Held back until this flush is over, so its turns always make progress.
        state.dirty = std::mem::take(&mut state.flush_held);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterRecord;
    use crate::domain::ClusterStatus;
    use crate::domain::{ProxmoxUser, Secret};
    use chrono::Utc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

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

    /// A healthy cluster named `lab` at `url`, sealed by `vault`.
    fn lab_cluster(url: &str, vault: &Vault) -> (ClusterRecord, Credentials) {
        let id = ClusterId::now_v7();
        let now = Utc::now();
        let record = ClusterRecord {
            format: ClusterRecord::FORMAT,
            id,
            name: ClusterName::parse("lab").expect("name"),
            api_endpoint: Endpoint::parse(url).expect("endpoint"),
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
        (record, credentials)
    }

    fn fast_settings() -> RegistrySettings {
        RegistrySettings {
            monitor: MonitorSettings {
                interval: Duration::from_millis(50),
                proxmox_timeout: Duration::from_millis(200),
                members: crate::proxmox::members::MemberPolicy::default(),
            },
            failure_threshold: 3,
            flush_interval: FLUSH_INTERVAL,
        }
    }

    /// A standalone registry over a fresh database holding the `lab` cluster (made by
    /// `cluster` from its record) at a Proxmox that hangs up, with its monitors on `proxmox`.
    struct TestRegistry {
        registry: ActorRef<RegistryMsg>,
        task: tokio::task::JoinHandle<()>,
        id: ClusterId,
        connections: Arc<AtomicUsize>,
        _dir: tempfile::TempDir,
    }

    async fn start_registry(
        cluster: impl FnOnce(ClusterRecord, Credentials) -> Cluster,
        proxmox: ProxmoxRuntime,
    ) -> TestRegistry {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db.redb")).expect("store");
        let vault = Vault::create(&dir.path().join("key")).expect("key");
        let (url, connections) = hang_up_server();
        let (record, credentials) = lab_cluster(&url, &vault);
        let id = record.id;
        let (registry, task) = Actor::spawn(
            None,
            RegistryActor,
            RegistryArgs {
                store,
                vault: Arc::new(vault),
                clusters: vec![cluster(record, credentials)],
                settings: fast_settings(),
                trust: TrustAnchors::load(None, false).expect("trust anchors"),
                proxmox,
                leadership: Leadership::standalone(),
            },
        )
        .await
        .expect("registry starts");
        TestRegistry {
            registry,
            task,
            id,
            connections,
            _dir: dir,
        }
    }

    #[tokio::test]
    async fn a_failed_monitor_is_restarted_and_keeps_checking() {
        let TestRegistry {
            registry,
            task,
            id,
            connections,
            _dir,
        } = start_registry(
            |record, credentials| Cluster::loaded(record, credentials, Vec::new()),
            ProxmoxRuntime::current(),
        )
        .await;

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

    #[tokio::test]
    async fn a_cluster_whose_monitor_never_reports_is_rendered_stale_once_its_deadline_passes() {
        // The monitors' runtime is never driven: the monitor starts but never checks, as a
        // stuck one would.
        let frozen = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let settings = fast_settings();
        let stale_after =
            settings.monitor.interval * STALE_AFTER_INTERVALS + settings.monitor.longest_silence();
        // Just registered: checked now, by the registration's probe.
        let TestRegistry {
            registry,
            task,
            id,
            connections,
            _dir,
        } = start_registry(
            Cluster::registered,
            ProxmoxRuntime::on(frozen.handle().clone()),
        )
        .await;

        let rendered_reason = || async {
            let read = ractor::call!(registry, RegistryMsg::ReadCluster, id)
                .expect("registry answers")
                .expect("cluster registered");
            let body: serde_json::Value =
                serde_json::from_slice(&read.rendered.body).expect("JSON");
            body["status_reason"].as_str().map(str::to_owned)
        };
        assert_eq!(rendered_reason().await.as_deref(), Some("ok"));
        let started = Instant::now();
        let deadline = started + stale_after + Duration::from_secs(10);
        while rendered_reason().await.as_deref() != Some("stale") {
            assert!(Instant::now() < deadline, "never rendered stale");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(started.elapsed() >= stale_after - Duration::from_millis(100));
        assert_eq!(
            connections.load(Ordering::SeqCst),
            0,
            "the monitor never checked"
        );

        registry.stop(None);
        task.await.expect("registry stops cleanly");
        frozen.shutdown_background();
    }
}
