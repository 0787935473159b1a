//! A registered cluster as the registry holds it, and the rules that turn Proxmox's answers
//! into a status.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

use crate::domain::Endpoint;
use crate::domain::{AuthMethod, ClusterId, ClusterStatus, Credentials, StatusReason};
use crate::domain::{ClusterName, ProxmoxUser, Secret, TokenId, capped_error_text};
use crate::proxmox::members::Member;
use crate::proxmox::members::{MemberReport, MemberView};
use crate::proxmox::{ClusterHealth, ProxmoxError};
use crate::secrets::SealedSecret;
use crate::tls::Fingerprint;

/// A cluster as it is persisted. The credential is only ever stored sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub format: u32,
    pub id: ClusterId,
    pub name: ClusterName,
    pub api_endpoint: Endpoint,
    pub username: ProxmoxUser,
    #[serde(default)]
    pub auth_method: AuthMethod,
    #[serde(default)]
    pub token_id: Option<TokenId>,
    /// The password or token secret, sealed under the key with the id as context.
    pub credential: SealedSecret,
    #[serde(default)]
    pub fingerprint: Option<Fingerprint>,
    pub proxmox_version: String,
    pub node_count: u32,
    pub nodes_online: u32,
    pub quorate: Option<bool>,
    pub status: ClusterStatus,
    pub status_reason: StatusReason,
    pub last_error: Option<String>,
    pub last_checked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Every known member with its pin, so failover works after a restart.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The endpoint that answered the newest check.
    #[serde(default)]
    pub active_endpoint: Option<Endpoint>,
}

impl ClusterRecord {
    /// The version of the stored JSON; a schema change is a new format.
    pub const FORMAT: u32 = 1;

    /// Takes what a monitor learns (status, version, nodes, members) from `other`, keeping
    /// this record's settings.
    pub fn adopt_status(&mut self, other: &ClusterRecord) {
        self.proxmox_version.clone_from(&other.proxmox_version);
        self.node_count = other.node_count;
        self.nodes_online = other.nodes_online;
        self.quorate = other.quorate;
        self.status = other.status;
        self.status_reason = other.status_reason;
        self.last_error.clone_from(&other.last_error);
        self.last_checked_at = other.last_checked_at;
        self.members.clone_from(&other.members);
        self.active_endpoint.clone_from(&other.active_endpoint);
        self.updated_at = self.updated_at.max(other.updated_at);
    }

    /// Whether `other` differs in what a settings change can change.
    pub fn settings_differ(&self, other: &ClusterRecord) -> bool {
        self.name != other.name
            || self.api_endpoint != other.api_endpoint
            || self.username != other.username
            || self.auth_method != other.auth_method
            || self.token_id != other.token_id
            || self.credential != other.credential
            || self.fingerprint != other.fingerprint
    }

    /// The credentials, given the opened secret; `None` for a token record without a token
    /// id, which only a corrupt database holds.
    pub fn credentials(&self, secret: Secret) -> Option<Credentials> {
        match (self.auth_method, &self.token_id) {
            (AuthMethod::Password, _) => Some(Credentials::Password {
                username: self.username.clone(),
                password: secret,
            }),
            (AuthMethod::Token, Some(token_id)) => Some(Credentials::Token {
                username: self.username.clone(),
                token_id: token_id.clone(),
                secret,
            }),
            (AuthMethod::Token, None) => None,
        }
    }
}

/// A monitor's verdict on one check.
#[derive(Debug, Clone)]
pub enum CheckOutcome {
    /// Proxmox answered; `version` is set when this check read `/version`.
    Answered {
        health: ClusterHealth,
        version: Option<String>,
    },
    Failed(ProxmoxError),
}

/// The status rules for a cluster that answered.
pub fn assess(health: &ClusterHealth) -> (ClusterStatus, StatusReason) {
    match health.quorate {
        Some(false) => (ClusterStatus::Unhealthy, StatusReason::QuorumLost),
        // Quorate, or a standalone node, which needs no quorum.
        _ if health.nodes_online < health.node_count => {
            (ClusterStatus::Degraded, StatusReason::NodeOffline)
        }
        _ => (ClusterStatus::Healthy, StatusReason::Ok),
    }
}

/// New settings for a registered cluster, already verified against Proxmox.
#[derive(Debug, Clone)]
pub struct SettingsChange {
    /// The name, changed or not.
    pub name: ClusterName,
    /// The registered endpoint, changed or not.
    pub api_endpoint: Endpoint,
    /// The credentials in clear, for the monitor.
    pub credentials: Credentials,
    /// The same secret sealed, for the store.
    pub credential: SealedSecret,
    /// The operator's pin, changed or not.
    pub fingerprint: Option<Fingerprint>,
    /// Members discovered anew because the endpoint or the trust changed; `None` keeps them.
    pub members: Option<Vec<Member>>,
    /// The fields whose values changed, by name, for the history.
    pub fields: Vec<String>,
}

impl ClusterRecord {
    /// This record with `change` applied.
    pub fn with_settings(&self, change: &SettingsChange) -> Self {
        let mut record = self.clone();
        record.name = change.name.clone();
        record.api_endpoint = change.api_endpoint.clone();
        record.username = change.credentials.username().clone();
        record.auth_method = change.credentials.method();
        record.token_id = change.credentials.token_id().cloned();
        record.credential = change.credential.clone();
        record.fingerprint = change.fingerprint;
        if let Some(members) = &change.members {
            record.members = members.clone();
            record.active_endpoint = Some(change.api_endpoint.clone());
        }
        record
    }
}

/// What applying a check changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckEffect {
    /// Something worth persisting changed (status, version, node counts, quorum, error).
    pub changed: bool,
    /// `(old, new)` when the status changed.
    pub status_change: Option<(ClusterStatus, ClusterStatus)>,
    /// The history gained an entry.
    pub history_changed: bool,
}

/// How many status transitions are kept per cluster.
pub const HISTORY_CAPACITY: usize = 200;

/// One status change, as `GET /api/v1/clusters/{id}/history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transition {
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: DateTime<Utc>,
    pub from: ClusterStatus,
    pub to: ClusterStatus,
    pub reason: StatusReason,
    /// Why the check failed, when it did.
    pub error: Option<String>,
    /// The member a membership entry (joined, left, pin rotated, failover) is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// The settings a `settings_changed` entry is about, by field name; never their values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

/// The newest [`HISTORY_CAPACITY`] of stored transitions, and the sequence number the next
/// one gets.
fn history_window(stored: Vec<(u64, Transition)>) -> (VecDeque<Transition>, u64) {
    let next_sequence = stored.last().map_or(0, |(sequence, _)| sequence + 1);
    let skip = stored.len().saturating_sub(HISTORY_CAPACITY);
    (
        stored.into_iter().skip(skip).map(|(_, t)| t).collect(),
        next_sequence,
    )
}

/// A registered cluster: its persisted record plus what only lives while the daemon runs.
#[derive(Debug)]
pub struct Cluster {
    pub record: ClusterRecord,
    pub credentials: Credentials,
    /// Newest last, at most [`HISTORY_CAPACITY`].
    history: VecDeque<Transition>,
    /// The sequence number the next transition is stored under.
    next_sequence: u64,
    /// Transitions not yet handed to the store, with their sequence numbers.
    unstored: Vec<(u64, Transition)>,
    consecutive_failures: u32,
    /// When the newest check completed, in this process; `None` until one has.
    last_check: Option<Instant>,
    /// When Proxmox last answered a check, in this process.
    last_success: Option<Instant>,
    /// The endpoint that answered the newest successful check, to tell a failover.
    last_active: Option<Endpoint>,
}

impl Cluster {
    /// A cluster just registered: the registration probe was its first check.
    pub fn registered(record: ClusterRecord, credentials: Credentials) -> Self {
        let first = Transition {
            at: record.created_at,
            from: ClusterStatus::Unknown,
            to: record.status,
            reason: record.status_reason,
            error: None,
            member: None,
            fields: Vec::new(),
        };
        let mut cluster = Self {
            last_active: record.active_endpoint.clone(),
            record,
            credentials,
            history: VecDeque::new(),
            next_sequence: 0,
            unstored: Vec::new(),
            consecutive_failures: 0,
            last_check: Some(Instant::now()),
            last_success: Some(Instant::now()),
        };
        cluster.remember(first);
        cluster
    }

    /// A cluster loaded at start: nothing is known of it until its monitor reports.
    pub fn loaded(
        mut record: ClusterRecord,
        credentials: Credentials,
        stored: Vec<(u64, Transition)>,
    ) -> Self {
        let (history, next_sequence) = history_window(stored);
        let before_restart = (record.status, record.status_reason);
        record.status = ClusterStatus::Unknown;
        record.status_reason = StatusReason::NotChecked;
        let mut cluster = Self {
            last_active: record.active_endpoint.clone(),
            record,
            credentials,
            history,
            next_sequence,
            unstored: Vec::new(),
            consecutive_failures: 0,
            last_check: None,
            last_success: None,
        };
        // The restart itself is a transition: the status is unknown until the next check, and
        // the history should read that way rather than jump from the last status before it.
        if before_restart.0 != ClusterStatus::Unknown {
            cluster.remember(Transition {
                at: Utc::now(),
                from: before_restart.0,
                to: ClusterStatus::Unknown,
                reason: StatusReason::NotChecked,
                error: None,
                member: None,
                fields: Vec::new(),
            });
        }
        cluster
    }

    /// A cluster another instance monitors, as the shared store holds it: its status stands
    /// as stored, and counts as fresh while a leader is at work.
    pub fn mirrored(
        record: ClusterRecord,
        credentials: Credentials,
        stored: Vec<(u64, Transition)>,
    ) -> Self {
        let (history, next_sequence) = history_window(stored);
        Self {
            last_active: record.active_endpoint.clone(),
            record,
            credentials,
            history,
            next_sequence,
            unstored: Vec::new(),
            consecutive_failures: 0,
            last_check: Some(Instant::now()),
            last_success: None,
        }
    }

    /// The leader is at work on this cluster: its stored status counts as fresh.
    pub fn mark_observed(&mut self) {
        self.last_check = Some(Instant::now());
    }

    /// Takes a status the leader stored; whether anything shown changed.
    pub fn adopt_remote_status(&mut self, status: &ClusterRecord) -> bool {
        let before = self.record.clone();
        self.record.adopt_status(status);
        if status.status != before.status {
            self.consecutive_failures = 0;
        }
        self.mark_observed();
        serde_json::to_value(&before).ok() != serde_json::to_value(&self.record).ok()
    }

    /// Takes settings another instance stored, keeping what this instance's monitor saw,
    /// except the members when a new endpoint or pin made that instance discover them anew.
    pub fn adopt_remote_settings(&mut self, record: ClusterRecord, credentials: Credentials) {
        let rediscovered = record.api_endpoint != self.record.api_endpoint
            || record.fingerprint != self.record.fingerprint;
        let mut record = record;
        let (members, active) = (record.members.clone(), record.active_endpoint.clone());
        record.adopt_status(&self.record);
        if rediscovered {
            record.members = members;
            record.active_endpoint = active;
            self.last_active = record.active_endpoint.clone();
        }
        self.record = record;
        self.credentials = credentials;
    }

    /// Replaces the history with the stored one: what this instance recorded but did not
    /// store (as a deposed leader) is dropped.
    pub fn replace_history(&mut self, stored: Vec<(u64, Transition)>) {
        (self.history, self.next_sequence) = history_window(stored);
        self.unstored.clear();
    }

    /// Adds a transition the leader stored, unless this instance has it already.
    pub fn mirror_history(&mut self, sequence: u64, transition: Transition) -> bool {
        if sequence < self.next_sequence {
            return false;
        }
        if self.history.len() == HISTORY_CAPACITY {
            self.history.pop_front();
        }
        self.history.push_back(transition);
        self.next_sequence = sequence + 1;
        true
    }

    /// Transitions recorded since the last call, with their sequence numbers, and the
    /// sequence number below which stored rows fall outside the cap.
    pub fn take_unstored_history(&mut self) -> (Vec<(u64, Transition)>, Option<u64>) {
        let trim = self
            .next_sequence
            .checked_sub(HISTORY_CAPACITY as u64)
            .filter(|below| *below > 0 && !self.unstored.is_empty());
        (std::mem::take(&mut self.unstored), trim)
    }

    /// Whether transitions wait to be stored.
    pub fn has_unstored_history(&self) -> bool {
        !self.unstored.is_empty()
    }

    /// Status transitions, newest first.
    pub fn history_newest_first(&self) -> Vec<Transition> {
        self.history.iter().rev().cloned().collect()
    }

    /// When Proxmox last answered a check, if it has since the daemon started.
    pub fn last_success(&self) -> Option<Instant> {
        self.last_success
    }

    pub fn id(&self) -> ClusterId {
        self.record.id
    }

    /// Applies one check. Failures that may be a lost packet keep the last status until
    /// `failure_threshold` of them come in a row; rejected credentials and missing privileges
    /// are certain at once. Any answer heals whatever the failure was.
    pub fn apply_check(
        &mut self,
        outcome: CheckOutcome,
        failure_threshold: u32,
        now: DateTime<Utc>,
    ) -> CheckEffect {
        let before = (
            self.record.status,
            self.record.proxmox_version.clone(),
            self.record.node_count,
            self.record.nodes_online,
            self.record.quorate,
        );
        let before_detail = (self.record.status_reason, self.record.last_error.clone());
        match outcome {
            CheckOutcome::Answered { health, version } => {
                self.consecutive_failures = 0;
                self.last_success = Some(Instant::now());
                let (status, reason) = assess(&health);
                self.record.status = status;
                self.record.status_reason = reason;
                self.record.node_count = health.node_count;
                self.record.nodes_online = health.nodes_online;
                self.record.quorate = health.quorate;
                if let Some(version) = version {
                    self.record.proxmox_version = version;
                }
                self.record.last_error = None;
            }
            CheckOutcome::Failed(error) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let reason = error.status_reason();
                let certain = matches!(reason, StatusReason::AuthFailed | StatusReason::Forbidden);
                if certain || self.consecutive_failures >= failure_threshold {
                    self.record.status = ClusterStatus::Unhealthy;
                    self.record.status_reason = reason;
                }
                self.record.last_error = Some(capped_error_text(error.to_string()));
            }
        }
        self.record.last_checked_at = Some(now);
        self.last_check = Some(Instant::now());
        let after = (
            self.record.status,
            self.record.proxmox_version.clone(),
            self.record.node_count,
            self.record.nodes_online,
            self.record.quorate,
        );
        let shown_changed = before != after;
        if shown_changed {
            self.record.updated_at = now;
        }
        if before.0 != after.0 {
            self.remember(Transition {
                at: now,
                from: before.0,
                to: after.0,
                reason: self.record.status_reason,
                error: self.record.last_error.clone(),
                member: None,
                fields: Vec::new(),
            });
        }
        CheckEffect {
            changed: shown_changed
                || before_detail != (self.record.status_reason, self.record.last_error.clone()),
            status_change: (before.0 != after.0).then_some((before.0, after.0)),
            history_changed: before.0 != after.0,
        }
    }

    fn remember(&mut self, transition: Transition) {
        if self.history.len() == HISTORY_CAPACITY {
            self.history.pop_front();
        }
        self.unstored.push((self.next_sequence, transition.clone()));
        self.next_sequence += 1;
        self.history.push_back(transition);
    }

    /// The history entry a settings change makes, if it changes anything.
    pub fn settings_transition(
        &self,
        change: &SettingsChange,
        now: DateTime<Utc>,
    ) -> Option<Transition> {
        (!change.fields.is_empty()).then(|| Transition {
            at: now,
            from: self.record.status,
            to: self.record.status,
            reason: StatusReason::SettingsChanged,
            error: None,
            member: None,
            fields: change.fields.clone(),
        })
    }

    /// Takes the next history sequence number for an entry stored by other means than the
    /// batches of [`Cluster::take_unstored_history`], so no other entry gets it meanwhile.
    pub fn reserve_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }

    /// Applies settings whose history entry, if any, is stored already under a reserved
    /// sequence number (with the changed record, in one transaction).
    pub fn apply_settings(
        &mut self,
        change: SettingsChange,
        now: DateTime<Utc>,
        stored: Option<(u64, Transition)>,
    ) {
        self.record = self.record.with_settings(&change);
        if change.members.is_some() {
            self.last_active = self.record.active_endpoint.clone();
        }
        self.credentials = change.credentials;
        if change.fields.is_empty() {
            return;
        }
        self.record.updated_at = now;
        if let Some((_, transition)) = stored {
            if self.history.len() == HISTORY_CAPACITY {
                self.history.pop_front();
            }
            self.history.push_back(transition);
        }
    }

    /// Takes a monitor's view of the members. Joins, departures, adopted pins and failovers
    /// go into the history; any change moves `updated_at`.
    pub fn apply_members(&mut self, report: MemberReport, now: DateTime<Utc>) -> CheckEffect {
        let old = &self.record.members;
        let mut events: Vec<(StatusReason, String)> = Vec::new();
        // A cluster from before members were tracked has nothing to compare with.
        if !old.is_empty() && !report.baseline {
            for member in &report.members {
                match old.iter().find(|m| m.name == member.name) {
                    None => events.push((StatusReason::MemberJoined, member.name.clone())),
                    Some(known)
                        if known.fingerprint.is_some()
                            && member.fingerprint.is_some()
                            && known.fingerprint != member.fingerprint =>
                    {
                        events.push((StatusReason::PinRotated, member.name.clone()));
                    }
                    Some(_) => {}
                }
            }
            for gone in old
                .iter()
                .filter(|m| !report.members.iter().any(|n| n.name == m.name))
            {
                events.push((StatusReason::MemberLeft, gone.name.clone()));
            }
        }
        if let Some(active) = &report.active {
            if self.last_active.as_ref().is_some_and(|last| last != active) {
                let member = report
                    .members
                    .iter()
                    .find(|m| m.endpoint.as_ref() == Some(active))
                    .map_or_else(|| active.to_string(), |m| m.name.clone());
                events.push((StatusReason::Failover, member));
            }
            self.last_active = Some(active.clone());
        }
        let changed = self.record.members != report.members
            || self.record.active_endpoint != report.active
            || self.record.fingerprint != report.pin;
        self.record.members = report.members;
        self.record.active_endpoint = report.active;
        self.record.fingerprint = report.pin;
        if changed {
            self.record.updated_at = now;
        }
        let status = self.record.status;
        let history_changed = !events.is_empty();
        for (reason, member) in events {
            self.remember(Transition {
                at: now,
                from: status,
                to: status,
                reason,
                error: None,
                member: Some(member),
                fields: Vec::new(),
            });
        }
        CheckEffect {
            changed,
            status_change: None,
            history_changed,
        }
    }

    /// Whether the newest check is older than `stale_after`: the monitor is stuck or
    /// restarting.
    pub fn is_stale(&self, stale_after: Duration) -> bool {
        self.last_check.is_some_and(|at| at.elapsed() > stale_after)
    }

    /// When the status goes stale unless a check comes first; `None` before the first check.
    pub fn stale_at(&self, stale_after: Duration) -> Option<Instant> {
        self.last_check.map(|at| at + stale_after)
    }

    /// The cluster as the API shows it. A stale cluster shows `unknown`.
    pub fn view(&self, stale_after: Duration) -> ClusterView {
        let (status, status_reason) = if self.is_stale(stale_after) {
            (ClusterStatus::Unknown, StatusReason::Stale)
        } else {
            (self.record.status, self.record.status_reason)
        };
        let record = &self.record;
        ClusterView {
            id: record.id,
            name: record.name.as_str().to_owned(),
            api_endpoint: record.api_endpoint.as_str().to_owned(),
            status,
            proxmox_version: record.proxmox_version.clone(),
            node_count: record.node_count,
            created_at: record.created_at,
            updated_at: record.updated_at,
            last_checked_at: record.last_checked_at,
            status_reason,
            last_error: record.last_error.clone(),
            nodes_online: record.nodes_online,
            quorate: record.quorate,
            auth_method: record.auth_method,
            fingerprint: record.fingerprint,
            members: record.members.iter().map(|m| m.view()).collect(),
            active_endpoint: record
                .active_endpoint
                .as_ref()
                .map(|e| e.as_str().to_owned()),
        }
    }
}

/// The Cluster object of the API.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Cluster)]
pub struct ClusterView {
    #[schema(value_type = String, format = Uuid)]
    pub id: ClusterId,
    pub name: String,
    pub api_endpoint: String,
    pub status: ClusterStatus,
    pub proxmox_version: String,
    pub node_count: u32,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_checked_at: Option<DateTime<Utc>>,
    pub status_reason: StatusReason,
    pub last_error: Option<String>,
    pub nodes_online: u32,
    pub quorate: Option<bool>,
    pub auth_method: AuthMethod,
    /// The pinned certificate fingerprint, if any: uppercase hex pairs joined by colons.
    #[schema(value_type = Option<String>)]
    pub fingerprint: Option<Fingerprint>,
    /// Every member of the cluster, ordered by name.
    pub members: Vec<MemberView>,
    /// The endpoint that answered the newest check; null when none did.
    pub active_endpoint: Option<String>,
}

/// `2024-01-11T10:30:00Z`, as the API specification shows timestamps.
fn rfc3339<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Secs, true))
}

fn rfc3339_opt<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => rfc3339(at, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ClusterName, Endpoint, ProxmoxUser, Secret};

    fn health(quorate: Option<bool>, node_count: u32, nodes_online: u32) -> ClusterHealth {
        ClusterHealth {
            quorate,
            node_count,
            nodes_online,
        }
    }

    fn sample() -> Cluster {
        let vault_dir = tempfile::tempdir().expect("tempdir");
        let vault = crate::secrets::Vault::create(&vault_dir.path().join("k")).expect("key");
        let now = Utc::now();
        let record = ClusterRecord {
            format: ClusterRecord::FORMAT,
            id: ClusterId::now_v7(),
            name: ClusterName::parse("prod").expect("name"),
            api_endpoint: Endpoint::parse("https://pve:8006").expect("endpoint"),
            username: ProxmoxUser::parse("root@pam").expect("user"),
            auth_method: crate::domain::AuthMethod::Password,
            token_id: None,
            credential: vault.seal(&Secret::new("pw"), b"x").expect("seal"),
            fingerprint: None,
            proxmox_version: "8.4.1".into(),
            node_count: 3,
            nodes_online: 3,
            quorate: Some(true),
            status: ClusterStatus::Healthy,
            status_reason: StatusReason::Ok,
            last_error: None,
            last_checked_at: Some(now),
            created_at: now,
            updated_at: now,
            members: Vec::new(),
            active_endpoint: None,
        };
        let credentials = Credentials::Password {
            username: record.username.clone(),
            password: Secret::new("pw"),
        };
        Cluster::registered(record, credentials)
    }

    fn transition(to: ClusterStatus) -> Transition {
        Transition {
            at: Utc::now(),
            from: ClusterStatus::Healthy,
            to,
            reason: StatusReason::NodeOffline,
            error: None,
            member: None,
            fields: Vec::new(),
        }
    }

    #[test]
    fn a_leader_keeps_its_own_status_when_another_instance_changes_the_settings() {
        let mut leader = sample();
        leader.record.status = ClusterStatus::Degraded;
        leader.record.nodes_online = 2;
        let mut renamed = leader.record.clone();
        renamed.name = ClusterName::parse("prod-eu").expect("name");
        // Written by an instance that had not seen the last check yet.
        renamed.status = ClusterStatus::Healthy;
        renamed.nodes_online = 3;
        assert!(leader.record.settings_differ(&renamed));
        let credentials = leader.credentials.clone();
        leader.adopt_remote_settings(renamed, credentials);
        assert_eq!(leader.record.name.as_str(), "prod-eu");
        assert_eq!(leader.record.status, ClusterStatus::Degraded);
        assert_eq!(leader.record.nodes_online, 2);
    }

    #[test]
    fn a_follower_takes_the_leaders_status_and_history_in_order() {
        let mut follower = sample();
        let mut status = follower.record.clone();
        status.status = ClusterStatus::Degraded;
        status.status_reason = StatusReason::NodeOffline;
        status.nodes_online = 2;
        assert!(follower.adopt_remote_status(&status));
        assert!(
            !follower.adopt_remote_status(&status),
            "the echo changes nothing"
        );
        assert_eq!(follower.record.status, ClusterStatus::Degraded);
        // The registration's transition is sequence 0: the leader's next is 1.
        assert!(follower.mirror_history(1, transition(ClusterStatus::Degraded)));
        assert!(!follower.mirror_history(1, transition(ClusterStatus::Degraded)));
        assert_eq!(follower.history_newest_first().len(), 2);
        follower.replace_history(vec![(0, transition(ClusterStatus::Unhealthy))]);
        let history = follower.history_newest_first();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].to, ClusterStatus::Unhealthy);
        assert!(!follower.has_unstored_history());
    }

    #[test]
    fn status_rules() {
        assert_eq!(assess(&health(Some(true), 3, 3)).0, ClusterStatus::Healthy);
        assert_eq!(assess(&health(None, 1, 1)).0, ClusterStatus::Healthy);
        assert_eq!(
            assess(&health(Some(true), 3, 2)),
            (ClusterStatus::Degraded, StatusReason::NodeOffline)
        );
        assert_eq!(
            assess(&health(Some(false), 3, 1)),
            (ClusterStatus::Unhealthy, StatusReason::QuorumLost)
        );
    }

    #[test]
    fn unreachable_needs_the_threshold_and_one_answer_heals() {
        let mut cluster = sample();
        let down = || CheckOutcome::Failed(ProxmoxError::Unreachable("connection refused".into()));
        for _ in 0..2 {
            cluster.apply_check(down(), 3, Utc::now());
            assert_eq!(cluster.record.status, ClusterStatus::Healthy);
        }
        let effect = cluster.apply_check(down(), 3, Utc::now());
        assert_eq!(
            effect.status_change,
            Some((ClusterStatus::Healthy, ClusterStatus::Unhealthy))
        );
        assert_eq!(cluster.record.status_reason, StatusReason::Unreachable);
        assert_eq!(
            cluster.record.last_error.as_deref(),
            Some("connection refused")
        );
        cluster.apply_check(
            CheckOutcome::Answered {
                health: health(Some(true), 3, 3),
                version: None,
            },
            3,
            Utc::now(),
        );
        assert_eq!(cluster.record.status, ClusterStatus::Healthy);
        assert_eq!(cluster.record.last_error, None);
        let history = cluster.history_newest_first();
        let steps: Vec<_> = history.iter().map(|t| (t.from, t.to)).collect();
        assert_eq!(
            steps,
            vec![
                (ClusterStatus::Unhealthy, ClusterStatus::Healthy),
                (ClusterStatus::Healthy, ClusterStatus::Unhealthy),
                (ClusterStatus::Unknown, ClusterStatus::Healthy),
            ]
        );
        assert_eq!(history[1].reason, StatusReason::Unreachable);
        assert_eq!(history[1].error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn history_is_capped() {
        let mut cluster = sample();
        for n in 0..(HISTORY_CAPACITY + 20) {
            let quorate = n % 2 == 0;
            cluster.apply_check(
                CheckOutcome::Answered {
                    health: health(Some(quorate), 3, 3),
                    version: None,
                },
                3,
                Utc::now(),
            );
        }
        assert_eq!(cluster.history_newest_first().len(), HISTORY_CAPACITY);
    }

    #[test]
    fn rejected_credentials_are_unhealthy_at_once() {
        let mut cluster = sample();
        cluster.apply_check(
            CheckOutcome::Failed(ProxmoxError::AuthenticationFailed),
            3,
            Utc::now(),
        );
        assert_eq!(cluster.record.status, ClusterStatus::Unhealthy);
        assert_eq!(cluster.record.status_reason, StatusReason::AuthFailed);
    }

    #[test]
    fn updated_at_moves_only_when_a_shown_field_changes() {
        let mut cluster = sample();
        let created = cluster.record.updated_at;
        let same = CheckOutcome::Answered {
            health: health(Some(true), 3, 3),
            version: Some("8.4.1".into()),
        };
        let effect = cluster.apply_check(same, 3, created + chrono::Duration::seconds(5));
        assert!(!effect.changed);
        assert_eq!(cluster.record.updated_at, created);
        let later = created + chrono::Duration::seconds(10);
        let upgraded = CheckOutcome::Answered {
            health: health(Some(true), 3, 3),
            version: Some("9.0.3".into()),
        };
        assert!(cluster.apply_check(upgraded, 3, later).changed);
        assert_eq!(cluster.record.updated_at, later);
    }

    fn member(name: &str, endpoint: &str, fingerprint: u8) -> crate::proxmox::members::Member {
        let mut member = crate::proxmox::members::Member::registered(
            name,
            &Endpoint::parse(endpoint).expect("endpoint"),
        );
        member.registered = false;
        member.fingerprint =
            Some(Fingerprint::parse(&hex::encode([fingerprint; 32])).expect("fingerprint"));
        member
    }

    #[test]
    fn member_changes_go_into_the_history() {
        let mut cluster = sample();
        let pve1 = member("pve1", "https://127.0.0.2:8006", 1);
        let pve2 = member("pve2", "https://127.0.0.3:8006", 2);
        let pve3 = member("pve3", "https://127.0.0.4:8006", 3);
        let report = |members: Vec<crate::proxmox::members::Member>, active: &str| MemberReport {
            members,
            active: Some(Endpoint::parse(active).expect("endpoint")),
            pin: None,
            baseline: false,
        };
        let first = cluster.apply_members(
            report(vec![pve1.clone(), pve2.clone()], "https://127.0.0.2:8006"),
            Utc::now(),
        );
        assert!(first.changed);
        assert!(!first.history_changed, "nothing to compare with yet");
        let same = cluster.apply_members(
            report(vec![pve1.clone(), pve2.clone()], "https://127.0.0.2:8006"),
            Utc::now(),
        );
        assert!(!same.changed);
        let rotated = member("pve2", "https://127.0.0.3:8006", 9);
        let effect = cluster.apply_members(
            report(vec![pve1.clone(), rotated, pve3], "https://127.0.0.3:8006"),
            Utc::now(),
        );
        assert!(effect.changed && effect.history_changed);
        let entries: Vec<(StatusReason, Option<String>)> = cluster
            .history_newest_first()
            .into_iter()
            .take(3)
            .map(|t| (t.reason, t.member))
            .collect();
        assert_eq!(
            entries,
            vec![
                (StatusReason::Failover, Some("pve2".into())),
                (StatusReason::MemberJoined, Some("pve3".into())),
                (StatusReason::PinRotated, Some("pve2".into())),
            ]
        );
        cluster.apply_members(report(vec![pve1], "https://127.0.0.3:8006"), Utc::now());
        let left: Vec<_> = cluster
            .history_newest_first()
            .into_iter()
            .take(2)
            .map(|t| (t.reason, t.member))
            .collect();
        assert!(
            left.contains(&(StatusReason::MemberLeft, Some("pve3".into()))),
            "{left:?}"
        );
    }

    #[test]
    fn a_silent_monitor_makes_the_status_unknown() {
        let cluster = sample();
        std::thread::sleep(Duration::from_millis(20));
        let view = cluster.view(Duration::from_millis(10));
        assert_eq!(
            (view.status, view.status_reason),
            (ClusterStatus::Unknown, StatusReason::Stale)
        );
    }
}
