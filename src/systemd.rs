//! systemd integration: readiness, a status line, stopping, and a watchdog that is only fed
//! while the registry answers. Outside systemd (no `NOTIFY_SOCKET`) all of it is a no-op.

use std::time::Duration;

use ractor::{ActorRef, call_t};
use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::domain::ClusterStatus;
use crate::registry::{ClusterSnapshot, HealthProblem, RegistryMsg};

/// How often the status line is refreshed when no watchdog asks for more.
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

fn under_systemd() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with the first status line: the database is open, every cluster is loaded and
/// the listener is bound.
pub fn ready(snapshot: &[ClusterSnapshot]) {
    if under_systemd() {
        notify(&[
            NotifyState::Ready,
            NotifyState::Status(&status_line(snapshot)),
        ]);
    }
}

pub fn stopping() {
    if under_systemd() {
        notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// Refreshes the status line and, with `WatchdogSec=`, pings the watchdog, but only after the
/// registry has answered: a wedged registry stops the pings and systemd restarts the service.
pub fn spawn_supervision(registry: ActorRef<RegistryMsg>, mut stop: watch::Receiver<bool>) {
    if !under_systemd() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    // Ping at half the watchdog timeout, as sd_watchdog_enabled(3) recommends.
    let period = watchdog.map_or(STATUS_INTERVAL, |timeout| {
        (timeout / 2).min(STATUS_INTERVAL)
    });
    let reply_timeout_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX).max(1);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            match call_t!(registry, RegistryMsg::Ping, reply_timeout_ms) {
                // An unreachable etcd is every instance's problem: restarting would not help.
                Ok(report) => match report.problem {
                    Some(HealthProblem::LocalWrites(reason)) => {
                        tracing::error!(%reason, "withholding the watchdog ping");
                        continue;
                    }
                    Some(HealthProblem::SharedStore(_)) | None => {}
                },
                Err(e) => {
                    tracing::error!(error = %e, "the registry did not answer; withholding the watchdog ping");
                    continue;
                }
            }
            match call_t!(registry, RegistryMsg::Snapshot, reply_timeout_ms) {
                Ok(snapshot) => {
                    let line = status_line(&snapshot.figures());
                    if watchdog.is_some() {
                        notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
                    } else {
                        notify(&[NotifyState::Status(&line)]);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "the registry did not answer; withholding the watchdog ping");
                }
            }
        }
    });
}

/// E.g. `3 clusters: 2 healthy, 1 degraded, 0 unhealthy, 0 unknown`.
pub fn status_line(snapshot: &[ClusterSnapshot]) -> String {
    let count = |status| snapshot.iter().filter(|c| c.view.status == status).count();
    format!(
        "{} clusters: {} healthy, {} degraded, {} unhealthy, {} unknown",
        snapshot.len(),
        count(ClusterStatus::Healthy),
        count(ClusterStatus::Degraded),
        count(ClusterStatus::Unhealthy),
        count(ClusterStatus::Unknown),
    )
}
