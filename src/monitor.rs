//! One monitor actor per cluster: it checks Proxmox on a fixed period, through whichever
//! member answers, and reports each outcome to the registry, which owns all state. A monitor
//! never writes to the database.
//!
//! The check runs inside the monitor's own handler: nothing but its timer ever messages it,
//! so awaiting Proxmox there stalls nobody, and `kill()` cancels a check in flight.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::cluster::CheckOutcome;
use crate::domain::{ClusterId, Credentials, Endpoint};
use crate::proxmox::members::{self, ChannelTrust, Member, MemberPolicy, MemberReport};
use crate::proxmox::{ProxmoxClient, ProxmoxError, Session, StatusReport};
use crate::registry::RegistryMsg;
use crate::tls::{Fingerprint, TrustAnchors};

/// Proxmox tickets live two hours; renew well before, as proxmox-login does at 90 minutes.
const TICKET_RENEW_AFTER: Duration = Duration::from_secs(90 * 60);
const TICKET_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// The first check comes within min(interval, this), spread so clusters do not fire together.
const MAX_FIRST_CHECK_DELAY: Duration = Duration::from_secs(5);
/// The longest a check is moved to start with others (see [`on_tick`]).
const MAX_TICK: Duration = Duration::from_millis(100);
const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(60 * 60);
/// Tokens never log in and tickets are renewed in place, so `/version` is also re-read on
/// this period: an upgrade shows within it.
const VERSION_REFRESH: Duration = Duration::from_secs(10 * 60);
/// Members are re-discovered at least this often, and at once when `/cluster/status` shows
/// a membership change.
const DISCOVERY_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// A member no check used is probed every min(this many intervals, [`MAX_PROBE_PERIOD`]).
const PROBE_INTERVALS: u32 = 10;
const MAX_PROBE_PERIOD: Duration = Duration::from_secs(10 * 60);
/// Like pveproxy's own certificate cache, a certificate mismatch re-reads join information
/// at most once a minute per cluster.
const MISMATCH_DISCOVERY_SPACING: Duration = Duration::from_secs(60);

/// A check makes at most three calls (login, version, cluster status), each bounded by the
/// Proxmox timeout; a re-login after a rejected ticket fits in the same budget or fails.
const CALLS_PER_CHECK: u32 = 3;

/// How monitors check, shared by all of them.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// The period between checks.
    pub interval: Duration,
    /// The bound on every request to Proxmox.
    pub proxmox_timeout: Duration,
    /// Whether and where members other than the registered node are used.
    pub members: MemberPolicy,
}

impl MonitorSettings {
    /// The longest one check may take before it counts as timed out.
    pub fn check_deadline(&self) -> Duration {
        self.proxmox_timeout * CALLS_PER_CHECK
    }

    /// The longest a registration's probe may take: a check's calls plus join information
    /// and, when that fails, `/nodes`.
    pub fn registration_deadline(&self) -> Duration {
        self.proxmox_timeout * (CALLS_PER_CHECK + 2)
    }

    /// How long a monitor may go without reporting before its cluster shows stale: a whole
    /// check plus the member maintenance after it (itself bounded by one check deadline).
    pub fn longest_silence(&self) -> Duration {
        self.check_deadline() * 2
    }

    fn probe_period(&self) -> Duration {
        (self.interval * PROBE_INTERVALS).min(MAX_PROBE_PERIOD)
    }
}

/// The monitor actor; its state is [`MonitorState`].
pub struct MonitorActor;

/// What a monitor starts with.
pub struct MonitorArgs {
    /// The cluster it watches.
    pub cluster_id: ClusterId,
    /// Tags reports so the registry can drop those of a monitor it has replaced.
    pub generation: u64,
    /// The registered endpoint.
    pub endpoint: Endpoint,
    /// The operator's pin for the registered endpoint.
    pub fingerprint: Option<Fingerprint>,
    /// The daemon-wide TLS trust.
    pub trust: TrustAnchors,
    /// The cluster's credentials.
    pub credentials: Credentials,
    /// The known members with their pins.
    pub members: Vec<Member>,
    /// The endpoint that answered last: the first check asks it first.
    pub active_endpoint: Option<Endpoint>,
    /// The session from the registration probe, so a new cluster costs one login, not two;
    /// its presence also means the members were discovered just now.
    pub session: Option<Session>,
    /// How to check.
    pub settings: MonitorSettings,
    /// Where reports go.
    pub registry: ActorRef<RegistryMsg>,
    /// Check at once rather than at the cluster's place in the start-up spread: the settings
    /// just changed, and the operator expects to see them at work.
    pub check_at_once: bool,
}

/// What a monitor is asked to do.
#[derive(Debug)]
pub enum MonitorMsg {
    /// Runs one check, then schedules the next.
    Check,
    /// An operator asked for a check at `requested_at`: run one, past any login back-off,
    /// unless a check was in flight then (its answer is as fresh); either way tell the
    /// registry when it is reported.
    CheckNow(Instant),
    /// Makes the monitor fail as a bug would, to exercise supervision.
    #[cfg(test)]
    Crash,
}

/// A monitor's working state.
pub struct MonitorState {
    cluster_id: ClusterId,
    generation: u64,
    credentials: Credentials,
    settings: MonitorSettings,
    registry: ActorRef<RegistryMsg>,
    roster: Roster,
    session: Option<Session>,
    /// `/version` is read after every login or renewal, and every [`VERSION_REFRESH`].
    version_due: bool,
    version_read_at: Option<Instant>,
    login_backoff: Option<LoginBackoff>,
    next_check: Instant,
    /// The first check runs at once (see [`MonitorArgs::check_at_once`]).
    check_at_once: bool,
    /// The registration's probe was this cluster's first check, moments ago: the first
    /// round only maintains the members, and checks resume an interval later.
    probed_at_registration: bool,
    /// When the newest check started, and when it was reported.
    last_check_span: Option<(Instant, Instant)>,
    /// A non-quorate answer the running check holds while it asks the other members.
    minority_view: Option<(String, StatusReport, Option<String>)>,
}

/// The members, how to reach each and what the monitor last saw of them.
struct Roster {
    registered: Endpoint,
    /// The operator's pin; follows a rotation another member vouched for.
    pin: Option<Fingerprint>,
    trust: TrustAnchors,
    channel: ChannelTrust,
    timeout: Duration,
    /// Whether checks come often enough to reuse a connection before pveproxy closes it.
    keep_alive: bool,
    policy: MemberPolicy,
    members: Vec<Member>,
    /// The member that answered last: the next check asks it first.
    preferred: Option<String>,
    /// Until the first discovery of a cluster stored before members were tracked.
    baseline: bool,
    /// A digest of what the last report said.
    reported_digest: Option<u64>,
    /// The endpoint that answered the newest check.
    active: Option<Endpoint>,
    clients: HashMap<String, (Endpoint, Option<Fingerprint>, ProxmoxClient)>,
    last_attempt: HashMap<String, Instant>,
    /// Certificates members presented against their pins since the last maintenance.
    mismatches: Vec<(String, Fingerprint, Fingerprint)>,
    /// The newest answer and who gave it, the base for discovery.
    last_status: Option<(String, StatusReport)>,
    config_version: Option<u64>,
    discovered_at: Option<Instant>,
    rediscover: bool,
    last_mismatch_discovery: Option<Instant>,
}

/// After Proxmox rejects the credentials, attempts are spaced out (doubling, up to an hour) so
/// a changed password or revoked token never makes this daemon a brute-forcer that fail2ban
/// bans. It is per cluster: every member checks the same credentials.
#[derive(Debug, Clone, Copy)]
struct LoginBackoff {
    delay: Duration,
    next_attempt: Instant,
}

impl Actor for MonitorActor {
    type Msg = MonitorMsg;
    type State = MonitorState;
    type Arguments = MonitorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: MonitorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let channel = ChannelTrust::of(
            &args.endpoint,
            args.fingerprint,
            args.trust.insecure_skip_verify(),
        );
        let mut members = args.members;
        let preferred = members
            .iter()
            .find(|m| m.endpoint.is_some() && m.endpoint == args.active_endpoint)
            .map(|m| m.name.clone());
        // A cluster stored before members were tracked: its first discovery is a baseline,
        // not a wave of joins.
        let baseline = members.is_empty();
        if !members.iter().any(|m| m.registered) {
            // A cluster from before members were tracked: its registered node is named once
            // it answers.
            members.push(Member::registered("", &args.endpoint));
        }
        let probed_at_registration = args.session.is_some() && !args.check_at_once;
        let mut last_attempt = HashMap::new();
        if probed_at_registration && let Some(registered) = members.iter().find(|m| m.registered) {
            last_attempt.insert(registered.name.clone(), Instant::now());
        }
        let mut roster = Roster {
            registered: args.endpoint,
            pin: args.fingerprint,
            trust: args.trust,
            channel,
            timeout: args.settings.proxmox_timeout,
            keep_alive: args.settings.interval < crate::proxmox::POOL_IDLE_TIMEOUT,
            policy: args.settings.members.clone(),
            members,
            preferred,
            baseline,
            reported_digest: None,
            // The probe's endpoint answered; the first report must not blank it.
            active: if probed_at_registration {
                args.active_endpoint.clone()
            } else {
                None
            },
            clients: HashMap::new(),
            last_attempt,
            mismatches: Vec::new(),
            last_status: None,
            config_version: None,
            discovered_at: args.session.is_some().then(Instant::now),
            rediscover: false,
            last_mismatch_discovery: None,
        };
        // The registration stored what the probe found: only a change since is news. Without
        // this, every registration's monitor would report the same members once more, and the
        // registry would rewrite each new cluster a few seconds after storing it.
        if probed_at_registration {
            roster.reported_digest = Some(roster.digest());
        }
        Ok(MonitorState {
            cluster_id: args.cluster_id,
            generation: args.generation,
            version_due: args.session.is_none(),
            version_read_at: args.session.is_some().then(Instant::now),
            session: args.session,
            credentials: args.credentials,
            settings: args.settings,
            registry: args.registry,
            roster,
            login_backoff: None,
            next_check: Instant::now(),
            check_at_once: args.check_at_once,
            probed_at_registration,
            last_check_span: None,
            minority_view: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let delay = if state.check_at_once {
            Duration::ZERO
        } else {
            first_check_delay(state.cluster_id, state.settings.interval)
        };
        state.next_check = Instant::now() + delay;
        myself.send_after(on_tick(delay, state.settings.interval), || {
            MonitorMsg::Check
        });
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MonitorMsg::Check => {
                if !std::mem::take(&mut state.probed_at_registration) {
                    state.check_and_report().await;
                }
                let deadline = state.settings.check_deadline();
                // Discovery and probes come after the report, so they never delay a status,
                // and under their own deadline, so a black-holed member cannot stall checks.
                let _ = tokio::time::timeout(deadline, state.maintain()).await;
                if let Some(members) = state.roster.report_if_changed() {
                    let _ = state.registry.cast(RegistryMsg::MembersChanged {
                        cluster: state.cluster_id,
                        generation: state.generation,
                        members,
                    });
                }
                // The baseline discovery has been reported; later ones are real changes.
                if state.roster.discovered_at.is_some() {
                    state.roster.baseline = false;
                }
                let delay = state.schedule_next();
                myself.send_after(on_tick(delay, state.settings.interval), || {
                    MonitorMsg::Check
                });
            }
            MonitorMsg::CheckNow(requested_at) => {
                let in_flight_then = state
                    .last_check_span
                    .is_some_and(|(start, end)| start <= requested_at && requested_at <= end);
                if !in_flight_then {
                    // The operator asked: one attempt past the login back-off, which goes on
                    // growing if Proxmox still refuses.
                    if let Some(backoff) = &mut state.login_backoff {
                        backoff.next_attempt = Instant::now();
                    }
                    state.check_and_report().await;
                }
                let _ = state
                    .registry
                    .cast(RegistryMsg::CheckNowDone(state.cluster_id));
            }
            #[cfg(test)]
            MonitorMsg::Crash => return Err("crash requested by a test".into()),
        }
        Ok(())
    }
}

/// Checks due within one tick (a hundredth of the interval, at most 100 ms) start together,
/// so the Proxmox thread wakes once for several of them and the registry takes their reports
/// in one go; a check moves by less than a tick.
fn on_tick(delay: Duration, interval: Duration) -> Duration {
    let tick = tick_of(interval);
    let due = (Instant::now() + delay).saturating_duration_since(*EPOCH);
    let tick_nanos = tick.as_nanos();
    let aligned_nanos = due.as_nanos().div_ceil(tick_nanos) * tick_nanos;
    let aligned = *EPOCH + Duration::from_nanos(u64::try_from(aligned_nanos).unwrap_or(u64::MAX));
    aligned.saturating_duration_since(Instant::now())
}

/// The ticks every monitor's checks are aligned to count from here.
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn tick_of(interval: Duration) -> Duration {
    (interval / 100).clamp(Duration::from_millis(1), MAX_TICK)
}

/// Spreads first checks over [0, min(interval, 5 s)) by cluster id, so a thousand clusters
/// loaded at start do not all hit the network in the same instant.
fn first_check_delay(cluster_id: ClusterId, interval: Duration) -> Duration {
    let window = interval.min(MAX_FIRST_CHECK_DELAY);
    let spread = (cluster_id.as_u128() % 1_000) as u32;
    window * spread / 1_000
}

/// Failures that say nothing about the cluster, only about the member asked: another member
/// may well answer.
fn member_failure(error: &ProxmoxError) -> bool {
    match error {
        ProxmoxError::Unreachable(_)
        | ProxmoxError::Timeout(_)
        | ProxmoxError::Tls(_)
        | ProxmoxError::CertificateNotTrusted { .. }
        | ProxmoxError::CertificateMismatch { .. } => true,
        ProxmoxError::Http { status, .. } => *status >= 500,
        _ => false,
    }
}

impl Roster {
    fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    fn member_mut(&mut self, name: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.name == name)
    }

    /// The members to ask, in order: the one that answered last, then those reachable last
    /// time, then those never tried, then those that failed; the registered node first among
    /// equals.
    fn candidates(&self) -> Vec<String> {
        let mut usable: Vec<&Member> = self
            .members
            .iter()
            .filter(|m| self.policy.may_contact(m, self.channel))
            .collect();
        usable.sort_by_key(|m| {
            let preferred = self.preferred.as_deref() == Some(m.name.as_str());
            let reachability = match m.reachable {
                Some(true) => 0,
                None => 1,
                Some(false) => 2,
            };
            (!preferred, reachability, !m.registered, m.name.clone())
        });
        usable.into_iter().map(|m| m.name.clone()).collect()
    }

    /// A client for the named member: the operator's trust for the registered node, the
    /// learned pin for every other.
    fn client(&mut self, name: &str) -> Result<ProxmoxClient, ProxmoxError> {
        let member = self
            .member(name)
            .ok_or_else(|| ProxmoxError::Unreachable(format!("{name} is not a member")))?;
        let endpoint = member
            .endpoint
            .clone()
            .ok_or_else(|| ProxmoxError::Unreachable(format!("no address is known for {name}")))?;
        let pin = if member.registered {
            self.pin
        } else {
            member.fingerprint
        };
        if let Some((known_endpoint, known_pin, client)) = self.clients.get(name)
            && *known_endpoint == endpoint
            && *known_pin == pin
        {
            return Ok(client.clone());
        }
        let client = ProxmoxClient::with_pool(
            endpoint.clone(),
            self.timeout,
            &self.trust,
            pin,
            self.keep_alive,
        )?;
        // Only the member checks go to keeps its client (tens of KiB each): the others are
        // asked once a probe period, or during a failover, and build theirs when needed.
        let checked = match &self.preferred {
            Some(preferred) => preferred == name,
            None => member.registered,
        };
        if checked {
            self.clients.clear();
            self.clients
                .insert(name.to_owned(), (endpoint, pin, client.clone()));
        }
        Ok(client)
    }

    /// Records the outcome of any attempt on a member.
    fn note_attempt(&mut self, name: &str, result: Result<(), &ProxmoxError>) {
        self.last_attempt.insert(name.to_owned(), Instant::now());
        if let Err(ProxmoxError::CertificateMismatch { presented, pinned }) = result {
            self.mismatches.push((name.to_owned(), *presented, *pinned));
        }
        let Some(member) = self.member_mut(name) else {
            return;
        };
        match result {
            Ok(()) => {
                member.reachable = Some(true);
                member.last_error = None;
            }
            Err(ProxmoxError::CertificateMismatch { presented, pinned }) => {
                member.reachable = Some(false);
                member.last_error = Some(format!(
                    "tls_mismatch: the certificate does not match its pin; it presented SHA-256 \
                     fingerprint {presented}, but {pinned} is pinned"
                ));
            }
            Err(error) => {
                member.reachable = Some(false);
                member.last_error = Some(crate::domain::capped_error_text(error.to_string()));
            }
        }
    }

    /// Takes an answer as the cluster's view: who is online, whether membership changed.
    fn answered(&mut self, name: &str, status: StatusReport) {
        self.preferred = Some(name.to_owned());
        self.active = self.member(name).and_then(|m| m.endpoint.clone());
        if let Some(member) = self.member_mut(name)
            && member.registered
            && member.name.is_empty()
            && let Some(local) = status.local_node()
        {
            member.name = local.name.clone();
            let renamed = local.name.clone();
            self.clients.remove("");
            self.preferred = Some(renamed);
        }
        if self.policy.discovery {
            members::apply_online(&mut self.members, &status);
            if members::lists_unknown_node(&self.members, &status)
                || (self.config_version.is_some() && self.config_version != status.config_version)
            {
                self.rediscover = true;
            }
        } else {
            self.members = members::from_status(&self.members, &status, &self.registered);
        }
        self.config_version = status.config_version;
        let answering = self.preferred.clone().unwrap_or_default();
        self.last_status = Some((answering, status));
    }

    /// The report, unless nothing in it changed since the last one: most checks change
    /// nothing about the members, and cloning them for every check is measurable.
    /// What a report would say, in brief: equal digests, equal reports.
    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&self.members, &self.active, self.pin, self.baseline).hash(&mut hasher);
        hasher.finish()
    }

    fn report_if_changed(&mut self) -> Option<MemberReport> {
        let digest = self.digest();
        if self.reported_digest == Some(digest) {
            return None;
        }
        self.reported_digest = Some(digest);
        Some(self.report())
    }

    fn report(&self) -> MemberReport {
        let mut members = self.members.clone();
        members::note_refusals(&mut members, &self.policy, self.channel);
        members.retain(|m| !m.name.is_empty());
        MemberReport {
            members,
            active: self.active.clone(),
            pin: self.pin,
            baseline: self.baseline,
        }
    }
}

impl MonitorState {
    /// Keeps the period whatever a check took; checks missed while one ran long are skipped,
    /// not fired in a burst.
    fn schedule_next(&mut self) -> Duration {
        let interval = self.settings.interval;
        let now = Instant::now();
        self.next_check += interval;
        if self.next_check <= now {
            let behind = now.duration_since(self.next_check);
            let behind_nanos = behind.as_nanos() % interval.as_nanos().max(1);
            let into_period = Duration::from_nanos(u64::try_from(behind_nanos).unwrap_or(0));
            self.next_check = now + (interval - into_period);
        }
        self.next_check.saturating_duration_since(now)
    }

    /// Asks the members in turn until one answers. Only when none does is it a failure; a
    /// member that sees no quorum gives way to one that does.
    /// Runs one check under the check deadline and reports it to the registry.
    async fn check_and_report(&mut self) {
        let started = Instant::now();
        let deadline = self.settings.check_deadline();
        let outcome = match tokio::time::timeout(deadline, self.check()).await {
            Ok(outcome) => outcome,
            // A minority view already in hand beats reporting a timeout.
            Err(_) => match self.minority_view.take() {
                Some((name, status, version)) => self.answered(&name, status, version),
                None => CheckOutcome::Failed(ProxmoxError::Timeout(deadline)),
            },
        };
        if matches!(outcome, CheckOutcome::Failed(_)) {
            self.roster.active = None;
        }
        metrics::histogram!("proxmoxer_check_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        // The registry gone means the daemon is stopping; nothing to report to.
        let _ = self.registry.cast(RegistryMsg::CheckCompleted {
            cluster: self.cluster_id,
            generation: self.generation,
            outcome,
            members: self.roster.report_if_changed(),
        });
        self.last_check_span = Some((started, Instant::now()));
    }

    async fn check(&mut self) -> CheckOutcome {
        let candidates = self.roster.candidates();
        let mut first_failure = None;
        self.minority_view = None;
        for (index, name) in candidates.iter().enumerate() {
            // With a minority view in hand, only members that answered lately are worth the
            // wait: when quorum is lost, the others are the nodes that are down.
            let known_down = self.roster.member(name).and_then(|m| m.reachable) == Some(false);
            if self.minority_view.is_some() && known_down {
                continue;
            }
            match self.check_member(name).await {
                Ok((status, version)) => {
                    self.roster.note_attempt(name, Ok(()));
                    let others_left = index + 1 < candidates.len();
                    if status.health.quorate == Some(false) && others_left {
                        if self.minority_view.is_none() {
                            self.minority_view = Some((name.clone(), status, version));
                        }
                        continue;
                    }
                    return self.answered(name, status, version);
                }
                Err(error) if member_failure(&error) => {
                    self.roster.note_attempt(name, Err(&error));
                    first_failure.get_or_insert(error);
                }
                // Proxmox answered, and what it said holds on every member.
                Err(error) => return CheckOutcome::Failed(error),
            }
        }
        if let Some((name, status, version)) = self.minority_view.take() {
            return self.answered(&name, status, version);
        }
        CheckOutcome::Failed(first_failure.unwrap_or_else(|| {
            ProxmoxError::Unreachable("no member of the cluster can be contacted".into())
        }))
    }

    fn answered(
        &mut self,
        name: &str,
        status: StatusReport,
        version: Option<String>,
    ) -> CheckOutcome {
        let health = status.health;
        self.roster.answered(name, status);
        CheckOutcome::Answered { health, version }
    }

    /// One member's answer; a rejected ticket is replaced once by a fresh login.
    async fn check_member(
        &mut self,
        name: &str,
    ) -> Result<(StatusReport, Option<String>), ProxmoxError> {
        let client = self.roster.client(name)?;
        match self.ask(&client).await {
            Err(ProxmoxError::SessionRejected(reason)) => {
                self.session = None;
                if matches!(self.credentials, Credentials::Token { .. }) {
                    self.credentials_rejected();
                    return Err(ProxmoxError::AuthenticationFailed);
                }
                // The ticket was revoked, or Proxmox rotated its key: log in once more now.
                tracing::debug!(cluster_id = %self.cluster_id, %reason, "ticket rejected; logging in again");
                self.ask(&client).await
            }
            other => other,
        }
    }

    async fn ask(
        &mut self,
        client: &ProxmoxClient,
    ) -> Result<(StatusReport, Option<String>), ProxmoxError> {
        let session = self.session(client).await?;
        let refresh_due = self
            .version_read_at
            .is_none_or(|at| at.elapsed() >= VERSION_REFRESH);
        let version = if self.version_due || refresh_due {
            let version = client.version(&session).await?;
            self.version_due = false;
            self.version_read_at = Some(Instant::now());
            Some(version)
        } else {
            None
        };
        let status = client.cluster_status(&session).await?;
        // Proxmox accepted the credentials: a later rejection starts the back-off afresh.
        self.login_backoff = None;
        Ok((status, version))
    }

    /// A usable session: the current one, a renewed ticket, or a fresh login, through
    /// `client`. A ticket is valid on every member, so failing over never logs in again.
    async fn session(&mut self, client: &ProxmoxClient) -> Result<Session, ProxmoxError> {
        match &self.session {
            Some(session @ Session::Token(_)) => return Ok(session.clone()),
            Some(Session::Ticket(ticket)) => {
                if ticket.age() < TICKET_RENEW_AFTER {
                    return Ok(Session::Ticket(ticket.clone()));
                }
                if ticket.age() < TICKET_LIFETIME {
                    match client.refresh(self.credentials.username(), ticket).await {
                        Ok(renewed) => {
                            let renewed = Session::Ticket(renewed);
                            self.session = Some(renewed.clone());
                            self.version_due = true;
                            return Ok(renewed);
                        }
                        // This member is down, not the ticket: the next member renews it.
                        Err(e) if member_failure(&e) => return Err(e),
                        Err(_) => {}
                    }
                }
                self.session = None;
            }
            None => {}
        }
        if let Some(backoff) = self.login_backoff
            && Instant::now() < backoff.next_attempt
        {
            return Err(ProxmoxError::AuthenticationFailed);
        }
        match client.open_session(&self.credentials).await {
            Ok(session) => {
                self.version_due = true;
                self.session = Some(session.clone());
                Ok(session)
            }
            Err(e @ (ProxmoxError::AuthenticationFailed | ProxmoxError::TwoFactorRequired)) => {
                self.credentials_rejected();
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn credentials_rejected(&mut self) {
        let delay = self
            .login_backoff
            .map_or(self.settings.interval * 2, |b| b.delay * 2)
            .min(MAX_LOGIN_BACKOFF);
        tracing::warn!(
            cluster_id = %self.cluster_id,
            retry_in = %humantime::format_duration(delay),
            "Proxmox rejected the stored credentials; backing off further attempts"
        );
        self.login_backoff = Some(LoginBackoff {
            delay,
            next_attempt: Instant::now() + delay,
        });
    }

    /// Between checks: probe members no check used lately, settle certificate mismatches and
    /// re-discover members when due.
    async fn maintain(&mut self) {
        if !self.settings.members.discovery {
            return;
        }
        self.settle_mismatches().await;
        let due = self.roster.rediscover
            || self
                .roster
                .discovered_at
                .is_none_or(|at| at.elapsed() >= DISCOVERY_INTERVAL);
        if due
            && let Some((name, status)) = self.roster.last_status.clone()
            && let Err(e) = self.discover_through(&name, &status).await
        {
            tracing::info!(cluster_id = %self.cluster_id, member = %name, error = %e, "member discovery failed; will retry");
        }
        self.probe_idle_members().await;
    }

    /// Reads the member list from `name` and folds it in.
    async fn discover_through(
        &mut self,
        name: &str,
        status: &StatusReport,
    ) -> Result<crate::proxmox::Discovery, ProxmoxError> {
        let (client, session) = self.established(name)?;
        let discovery = client.discover(&session, status).await;
        match &discovery {
            Ok(_) => self.roster.note_attempt(name, Ok(())),
            Err(e) if member_failure(e) => self.roster.note_attempt(name, Err(e)),
            Err(_) => {}
        }
        let discovery = discovery?;
        let roster = &mut self.roster;
        roster.members = members::merge(
            &roster.members,
            &discovery,
            &roster.registered,
            roster.channel,
        );
        // Proxmox's view of who is online applies to new members right away.
        members::apply_online(&mut roster.members, status);
        roster.discovered_at = Some(Instant::now());
        roster.rediscover = false;
        Ok(discovery)
    }

    /// One authenticated `GET /version` to each member no check has used for a probe period,
    /// so `reachable` stays current without hammering anyone.
    async fn probe_idle_members(&mut self) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let period = self.settings.probe_period();
        let idle: Vec<String> = self
            .roster
            .members
            .iter()
            .filter(|m| self.roster.policy.may_contact(m, self.roster.channel))
            .filter(|m| {
                self.roster
                    .last_attempt
                    .get(&m.name)
                    .is_none_or(|at| at.elapsed() >= period)
            })
            .map(|m| m.name.clone())
            .collect();
        // All at once: a member that drops packets costs one timeout, not one each.
        let probes: Vec<_> = idle
            .into_iter()
            .map(|name| {
                let client = self.roster.client(&name);
                let session = session.clone();
                async move {
                    let result = match client {
                        Ok(client) => client.ping(&session).await,
                        Err(e) => Err(e),
                    };
                    (name, result)
                }
            })
            .collect();
        for (name, result) in futures_util::future::join_all(probes).await {
            match &result {
                // Proxmox answered: the member is reachable, whatever it thought of us.
                Err(e) if !member_failure(e) => self.roster.note_attempt(&name, Ok(())),
                other => self.roster.note_attempt(&name, other.as_ref().map(|_| ())),
            }
        }
    }

    /// A member presented a certificate other than its pin. Another member whose certificate
    /// verified is asked for fresh join information: if it vouches for the presented
    /// certificate, that becomes the pin; if not, the member stays refused.
    async fn settle_mismatches(&mut self) {
        let mut mismatches = std::mem::take(&mut self.roster.mismatches);
        // One member may have been met twice; its latest certificate counts.
        mismatches.reverse();
        mismatches.dedup_by(|a, b| a.0 == b.0);
        let recently = self
            .roster
            .last_mismatch_discovery
            .is_some_and(|at| at.elapsed() < MISMATCH_DISCOVERY_SPACING);
        if mismatches.is_empty() || recently || self.roster.channel != ChannelTrust::Verified {
            return;
        }
        let voucher = self.roster.candidates().into_iter().find(|m| {
            !mismatches.iter().any(|(name, _, _)| name == m)
                && self.roster.member(m).and_then(|m| m.reachable) == Some(true)
        });
        let Some(voucher) = voucher else {
            for (name, presented, pinned) in &mismatches {
                if let Some(member) = self.roster.member_mut(name) {
                    member.last_error = Some(format!(
                        "tls_mismatch: the certificate changed and no other member can vouch \
                         for it; it now presents SHA-256 fingerprint {presented}, but {pinned} \
                         is pinned"
                    ));
                }
            }
            return;
        };
        self.roster.last_mismatch_discovery = Some(Instant::now());
        let status = match self.status_of(&voucher).await {
            Ok(status) => status,
            Err(e) => {
                tracing::info!(cluster_id = %self.cluster_id, member = %voucher, error = %e, "cannot ask a member to vouch for a changed certificate");
                return;
            }
        };
        let discovery = match self.discover_through(&voucher, &status).await {
            Ok(discovery) => discovery,
            Err(e) => {
                tracing::info!(cluster_id = %self.cluster_id, member = %voucher, error = %e, "cannot read join information to vouch for a changed certificate");
                return;
            }
        };
        for (name, presented, pinned) in mismatches {
            let vouched = discovery.fingerprint_of(&name) == Some(presented);
            self.adopt_or_refuse(&name, &voucher, presented, pinned, vouched);
        }
    }

    async fn status_of(&mut self, name: &str) -> Result<StatusReport, ProxmoxError> {
        let (client, session) = self.established(name)?;
        client.cluster_status(&session).await
    }

    /// A client for `name` and the current session. Maintenance never logs in: it only
    /// follows a check, which left a session behind when Proxmox answered.
    fn established(&mut self, name: &str) -> Result<(ProxmoxClient, Session), ProxmoxError> {
        let client = self.roster.client(name)?;
        let session = self
            .session
            .clone()
            .ok_or_else(|| ProxmoxError::SessionRejected("no session".into()))?;
        Ok((client, session))
    }

    fn adopt_or_refuse(
        &mut self,
        name: &str,
        voucher: &str,
        presented: Fingerprint,
        pinned: Fingerprint,
        vouched: bool,
    ) {
        let roster = &mut self.roster;
        let Some(member) = roster.members.iter_mut().find(|m| m.name == name) else {
            return;
        };
        if vouched {
            tracing::warn!(
                cluster_id = %self.cluster_id,
                member = %name,
                vouched_by = %voucher,
                old = %pinned,
                new = %presented,
                "a member's certificate was renewed; adopting the fingerprint another member vouches for"
            );
            member.fingerprint = Some(presented);
            member.last_error = None;
            member.reachable = None;
            if member.registered && roster.pin.is_some() {
                roster.pin = Some(presented);
            }
            roster.clients.remove(name);
            // Try it again at the next maintenance rather than waiting a probe period.
            roster.last_attempt.remove(name);
        } else {
            tracing::warn!(
                cluster_id = %self.cluster_id,
                member = %name,
                asked = %voucher,
                presented = %presented,
                pinned = %pinned,
                "a member presents a certificate no verified member vouches for; not contacting it"
            );
            member.last_error = Some(format!(
                "tls_mismatch: the certificate does not match its pin and {voucher} does not \
                 vouch for it; it presented SHA-256 fingerprint {presented}, but {pinned} is \
                 pinned"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_move_to_the_next_tick_and_never_earlier() {
        for interval in [
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::from_secs(3600),
        ] {
            let tick = tick_of(interval);
            for delay_ms in [0, 1, 7, 99, 100, 101, 4_999, 10_000] {
                let delay = Duration::from_millis(delay_ms);
                let before = Instant::now();
                let due = Instant::now() + on_tick(delay, interval);
                let after = Instant::now();
                assert!(due >= before + delay, "{interval:?}/{delay:?}: not earlier");
                assert!(
                    due <= after + delay + tick,
                    "{interval:?}/{delay:?}: within a tick"
                );
                let nanos = due.duration_since(*EPOCH).as_nanos() % tick.as_nanos();
                // Instants are read twice; allow the microseconds between the reads.
                let off = nanos.min(tick.as_nanos() - nanos);
                assert!(
                    off < 1_000_000,
                    "{interval:?}/{delay:?}: {off} ns off the tick"
                );
            }
        }
        assert_eq!(tick_of(Duration::from_secs(10)), Duration::from_millis(100));
        assert_eq!(tick_of(Duration::from_secs(1)), Duration::from_millis(10));
        assert_eq!(tick_of(Duration::from_millis(50)), Duration::from_millis(1));
    }

    #[test]
    fn first_checks_are_spread_within_the_window() {
        let interval = Duration::from_secs(30);
        let delays: Vec<Duration> = (0..200)
            .map(|_| first_check_delay(ClusterId::now_v7(), interval))
            .collect();
        assert!(delays.iter().all(|d| *d < MAX_FIRST_CHECK_DELAY));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 50,
            "delays should spread, got {distinct:?}"
        );
        assert!(
            first_check_delay(ClusterId::now_v7(), Duration::from_millis(100))
                < Duration::from_millis(100)
        );
    }

    #[test]
    fn only_failures_of_the_member_itself_fail_over() {
        assert!(member_failure(&ProxmoxError::Unreachable("refused".into())));
        assert!(member_failure(&ProxmoxError::Timeout(Duration::from_secs(
            1
        ))));
        assert!(member_failure(&ProxmoxError::Http {
            status: 596,
            reason: "Broken pipe".into()
        }));
        assert!(!member_failure(&ProxmoxError::AuthenticationFailed));
        assert!(!member_failure(&ProxmoxError::Forbidden("no".into())));
    }
}
