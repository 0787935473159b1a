//! One monitor actor per cluster: it checks Proxmox on a fixed period and reports each
//! outcome to the registry, which owns all state. A monitor never writes to the database.
//!
//! The check runs inside the monitor's own handler: nothing but its timer ever messages it,
//! so awaiting Proxmox there stalls nobody, and `kill()` cancels a check in flight.

use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::cluster::CheckOutcome;
use crate::domain::{ClusterId, Credentials, Endpoint};
use crate::proxmox::{ProxmoxClient, ProxmoxError, Session};
use crate::registry::RegistryMsg;
use crate::tls::{Fingerprint, TrustAnchors};

/// Proxmox tickets live two hours; renew well before, as proxmox-login does at 90 minutes.
const TICKET_RENEW_AFTER: Duration = Duration::from_secs(90 * 60);
const TICKET_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// The first check comes within min(interval, this), spread so clusters do not fire together.
const MAX_FIRST_CHECK_DELAY: Duration = Duration::from_secs(5);
const MAX_LOGIN_BACKOFF: Duration = Duration::from_secs(60 * 60);
/// Tokens never log in and tickets are renewed in place, so `/version` is also re-read on
/// this period: an upgrade shows within it.
const VERSION_REFRESH: Duration = Duration::from_secs(10 * 60);

/// A check makes at most three calls (login, version, cluster status), each bounded by the
/// Proxmox timeout; a re-login after a rejected ticket fits in the same budget or fails.
const CALLS_PER_CHECK: u32 = 3;

#[derive(Debug, Clone, Copy)]
pub struct MonitorSettings {
    pub interval: Duration,
    pub proxmox_timeout: Duration,
}

impl MonitorSettings {
    /// The longest one check may take before it counts as timed out.
    pub fn check_deadline(&self) -> Duration {
        self.proxmox_timeout * CALLS_PER_CHECK
    }
}

pub struct MonitorActor;

pub struct MonitorArgs {
    pub cluster_id: ClusterId,
    /// Tags reports so the registry can drop those of a monitor it has replaced.
    pub generation: u64,
    pub endpoint: Endpoint,
    pub fingerprint: Option<Fingerprint>,
    pub trust: TrustAnchors,
    pub credentials: Credentials,
    /// The session from the registration probe, so a new cluster costs one login, not two.
    pub session: Option<Session>,
    pub settings: MonitorSettings,
    pub registry: ActorRef<RegistryMsg>,
}

#[derive(Debug)]
pub enum MonitorMsg {
    Check,
    /// Makes the monitor fail as a bug would, to exercise supervision.
    #[cfg(test)]
    Crash,
}

pub struct MonitorState {
    cluster_id: ClusterId,
    generation: u64,
    client: ProxmoxClient,
    credentials: Credentials,
    settings: MonitorSettings,
    registry: ActorRef<RegistryMsg>,
    session: Option<Session>,
    /// `/version` is read after every login or renewal, and every [`VERSION_REFRESH`].
    version_due: bool,
    version_read_at: Option<Instant>,
    login_backoff: Option<LoginBackoff>,
    next_check: Instant,
}

/// After Proxmox rejects the credentials, attempts are spaced out (doubling, up to an hour) so
/// a changed password or revoked token never makes this daemon a brute-forcer that fail2ban
/// bans.
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
        let client = ProxmoxClient::new(
            args.endpoint,
            args.settings.proxmox_timeout,
            &args.trust,
            args.fingerprint,
        )?;
        Ok(MonitorState {
            cluster_id: args.cluster_id,
            generation: args.generation,
            client,
            version_due: args.session.is_none(),
            version_read_at: args.session.is_some().then(Instant::now),
            session: args.session,
            credentials: args.credentials,
            settings: args.settings,
            registry: args.registry,
            login_backoff: None,
            next_check: Instant::now(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let delay = first_check_delay(state.cluster_id, state.settings.interval);
        state.next_check = Instant::now() + delay;
        myself.send_after(delay, || MonitorMsg::Check);
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
                let started = Instant::now();
                let deadline = state.settings.check_deadline();
                let outcome = tokio::time::timeout(deadline, state.check())
                    .await
                    .unwrap_or(CheckOutcome::Failed(ProxmoxError::Timeout(deadline)));
                metrics::histogram!("proxmoxer_check_duration_seconds")
                    .record(started.elapsed().as_secs_f64());
                // The registry gone means the daemon is stopping; nothing to report to.
                let _ = state.registry.cast(RegistryMsg::CheckCompleted {
                    cluster: state.cluster_id,
                    generation: state.generation,
                    outcome,
                });
                let delay = state.schedule_next();
                myself.send_after(delay, || MonitorMsg::Check);
            }
            #[cfg(test)]
            MonitorMsg::Crash => return Err("crash requested by a test".into()),
        }
        Ok(())
    }
}

/// Spreads first checks over [0, min(interval, 5 s)) by cluster id, so a thousand clusters
/// loaded at start do not all hit the network in the same instant.
fn first_check_delay(cluster_id: ClusterId, interval: Duration) -> Duration {
    let window = interval.min(MAX_FIRST_CHECK_DELAY);
    let spread = (cluster_id.as_u128() % 1_000) as u32;
    window * spread / 1_000
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

    async fn check(&mut self) -> CheckOutcome {
        match self.check_once().await {
            Err(ProxmoxError::SessionRejected(reason)) => {
                self.session = None;
                if matches!(self.credentials, Credentials::Token { .. }) {
                    self.credentials_rejected();
                    return CheckOutcome::Failed(ProxmoxError::AuthenticationFailed);
                }
                // The ticket was revoked, or Proxmox rotated its key: log in once more now.
                tracing::debug!(cluster_id = %self.cluster_id, %reason, "ticket rejected; logging in again");
                self.check_once().await
            }
            other => other,
        }
        .unwrap_or_else(CheckOutcome::Failed)
    }

    async fn check_once(&mut self) -> Result<CheckOutcome, ProxmoxError> {
        let session = self.session().await?;
        let refresh_due = self
            .version_read_at
            .is_none_or(|at| at.elapsed() >= VERSION_REFRESH);
        let version = if self.version_due || refresh_due {
            let version = self.client.version(&session).await?;
            self.version_due = false;
            self.version_read_at = Some(Instant::now());
            Some(version)
        } else {
            None
        };
        let health = self.client.cluster_status(&session).await?;
        // Proxmox accepted the credentials: a later rejection starts the back-off afresh.
        self.login_backoff = None;
        Ok(CheckOutcome::Answered { health, version })
    }

    /// A usable session: the current one, a renewed ticket, or a fresh login.
    async fn session(&mut self) -> Result<Session, ProxmoxError> {
        match &self.session {
            Some(session @ Session::Token(_)) => return Ok(session.clone()),
            Some(Session::Ticket(ticket)) => {
                if ticket.age() < TICKET_RENEW_AFTER {
                    return Ok(Session::Ticket(ticket.clone()));
                }
                if ticket.age() < TICKET_LIFETIME
                    && let Ok(renewed) = self
                        .client
                        .refresh(self.credentials.username(), ticket)
                        .await
                {
                    let renewed = Session::Ticket(renewed);
                    self.session = Some(renewed.clone());
                    self.version_due = true;
                    return Ok(renewed);
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
        match self.client.open_session(&self.credentials).await {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
