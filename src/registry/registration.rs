//! Registration: reserve the name, probe Proxmox outside the actor, store durably through
//! the writer, then go live.

use chrono::Utc;
use ractor::{ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

use super::supervision::spawn_monitor;
use super::{
    NewCluster, RegistrationId, RegistryError, RegistryMsg, RegistryState, publish, render, writer,
};
use crate::cluster::{Cluster, ClusterRecord, ClusterView};
use crate::domain::{ClusterId, ClusterName, Credentials, Endpoint};
use crate::events::EventKind;
use crate::proxmox::members::{self, ChannelTrust, Member};
use crate::proxmox::{ProbeReport, ProxmoxClient, ProxmoxError, Session};
use crate::store::StoreError;
use crate::tls::Fingerprint;

/// A registration whose probe is running.
pub(super) struct PendingRegistration {
    pub(super) name: ClusterName,
    request: NewCluster,
    reply: RpcReplyPort<Result<ClusterView, RegistryError>>,
    pub(super) probe: JoinHandle<()>,
}

/// A registration the writer is storing; the name stays taken meanwhile.
pub(super) struct StoringRegistration {
    pub(super) cluster: Cluster,
    session: Session,
    reply: RpcReplyPort<Result<ClusterView, RegistryError>>,
}

pub(super) fn on_register(
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
    let probe = spawn_probe(
        myself,
        state,
        request.endpoint.clone(),
        request.fingerprint,
        request.credentials.clone(),
        move |result| RegistryMsg::ProbeFinished(id, result),
    );
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

/// Probes `endpoint` as a registration does (login, version, status, members), in a task of
/// its own under the registration deadline; `done` makes the registry's message of the result.
pub(super) fn spawn_probe(
    myself: &ActorRef<RegistryMsg>,
    state: &RegistryState,
    endpoint: Endpoint,
    pin: Option<Fingerprint>,
    credentials: Credentials,
    done: impl FnOnce(Result<ProbeReport, ProxmoxError>) -> RegistryMsg + Send + 'static,
) -> JoinHandle<()> {
    let timeout = state.settings.monitor.proxmox_timeout;
    let trust = state.trust.clone();
    let registry = myself.clone();
    // A bound of its own, so a slow Proxmox reads as a timeout, not as an unresponsive
    // registry.
    let deadline = state.settings.monitor.registration_deadline();
    let discover = state.settings.monitor.members.discovery;
    // Even building the client (TLS configuration included) happens off the actor: reads
    // must not queue behind a burst of registrations. An operator is waiting on the answer, so
    // it runs on the API's threads, not behind the monitors on the Proxmox thread (one thread
    // of lower priority held registrations to two thirds of the rate).
    tokio::spawn(async move {
        let probed = async {
            let client = ProxmoxClient::new(endpoint, timeout, &trust, pin)?;
            client.probe(&credentials, discover).await
        };
        let result = tokio::time::timeout(deadline, probed)
            .await
            .unwrap_or(Err(ProxmoxError::Timeout(deadline)));
        let _ = registry.cast(done(result));
    })
}

pub(super) fn on_probe_finished(
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
    store_registration(myself, state, id, pending, report);
}

/// Builds the cluster and hands it to the writer; it becomes visible, and the client hears
/// 201, only once it is durable. The name stays reserved meanwhile.
fn store_registration(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    registration: RegistrationId,
    pending: PendingRegistration,
    report: ProbeReport,
) {
    let request = pending.request;
    let id = ClusterId::now_v7();
    let now = Utc::now();
    let credential = match state
        .vault
        .seal(request.credentials.secret(), id.as_bytes())
    {
        Ok(credential) => credential,
        Err(e) => {
            let _ = pending.reply.send(Err(e.into()));
            return;
        }
    };
    let (status, status_reason) = crate::cluster::assess(&report.status.health);
    let members = discovered_members(state, &request.endpoint, request.fingerprint, &report);
    let record = ClusterRecord {
        format: ClusterRecord::FORMAT,
        id,
        name: request.name,
        api_endpoint: request.endpoint.clone(),
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
        active_endpoint: Some(request.endpoint),
    };
    let mut cluster = Cluster::registered(record, request.credentials);
    let mut batch = writer::batch_of(&mut cluster);
    batch.creates.push(id);
    let stored = state.writer.write_durably(batch);
    let registry = myself.clone();
    tokio::spawn(async move {
        let result = stored.await;
        let _ = registry.cast(RegistryMsg::RegistrationStored(registration, result));
    });
    state.storing.insert(
        registration,
        StoringRegistration {
            cluster,
            session: report.session,
            reply: pending.reply,
        },
    );
}

/// The writer is done with a registration: on success the cluster goes live.
pub(super) fn on_registration_stored(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    registration: RegistrationId,
    result: Result<(), StoreError>,
) {
    let Some(storing) = state.storing.remove(&registration) else {
        return;
    };
    if let Err(e) = result {
        tracing::error!(cluster = %storing.cluster.record.name, error = %e, "cannot store a registration");
        let _ = storing.reply.send(Err(e.into()));
        return;
    }
    if storing.reply.is_closed() {
        tracing::info!(cluster = %storing.cluster.record.name, "registered although its client went away while it was being stored");
    }
    let cluster = storing.cluster;
    let id = cluster.id();
    let view = cluster.view(state.stale_after());
    tracing::info!(cluster = %view.name, cluster_id = %id, endpoint = %view.api_endpoint, status = %view.status, "cluster registered");
    state.names.insert(cluster.record.name.clone());
    state.clusters.insert(id, cluster);
    render(state, id, true);
    publish(state, EventKind::Registered, &view);
    spawn_monitor(myself, state, id, Some(storing.session), false);
    let _ = storing.reply.send(Ok(view));
}

/// The members a probe of `endpoint` found (a registration's, or a settings change's):
/// the discovered ones under the endpoint's trust, or what `/cluster/status` lists when
/// discovery is off.
pub(super) fn discovered_members(
    state: &RegistryState,
    endpoint: &Endpoint,
    fingerprint: Option<Fingerprint>,
    report: &ProbeReport,
) -> Vec<Member> {
    let local = report
        .status
        .local_node()
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let start = vec![Member::registered(&local, endpoint)];
    let policy = &state.settings.monitor.members;
    let trust = ChannelTrust::of(endpoint, fingerprint, state.trust.insecure_skip_verify());
    let mut list = match &report.discovery {
        Some(discovery) => members::merge(&start, discovery, endpoint, trust),
        None => members::from_status(&start, &report.status, endpoint),
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
