//! The monitors as an operator sees them over HTTP: each registered cluster's status follows
//! what Proxmox says, failures that may be transient wait for the threshold, tickets are reused,
//! rejected credentials back off, and monitoring survives deletes, restarts and crashes.
//!
//! Intervals are short (100–400 ms) so the module stays fast. Conditions are awaited with
//! bounded polling; the few fixed sleeps observe that something does *not* happen, over a
//! window measured in monitor intervals, and say so where they are.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakePve};
use crate::helpers::{
    STATUS_PATH, TICKET_PATH, TestApp, WAIT, daemon_checking_every, fake_pve, fetch_cluster,
    has_status, id_of, is_healthy, list_clusters, register, register_fake, register_fake_id,
    timestamp, wait_for_cluster_skipping_stale, wait_for_member_probes, wait_until,
};

const VERSION_PATH: &str = "/api2/json/version";

/// A daemon checking every `interval`, with a 1 s Proxmox timeout.
async fn daemon(interval: &str) -> TestApp {
    daemon_checking_every(interval, "1s").spawn().await
}

/// Polls the fake until `condition` holds; panics after [`WAIT`].
async fn wait_for_fake(what: &str, mut condition: impl FnMut() -> bool) {
    let held = wait_until(async || condition(), WAIT).await;
    assert!(held, "timed out after {WAIT:?} waiting for {what}");
}

/// Timestamps have a resolution of one second. Waits until a check lands in a later second
/// than the cluster's `updated_at`, so that a change made from now on must move `updated_at`.
async fn wait_for_a_later_second(app: &TestApp, id: &str) -> Value {
    wait_for_cluster_skipping_stale(app, id, "a check in a later second than updated_at", |c| {
        !c["last_checked_at"].is_null()
            && timestamp(c, "last_checked_at") > timestamp(c, "updated_at")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_going_offline_makes_the_cluster_degraded_until_it_comes_back() {
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "node-offline").await;

    let probed = wait_for_member_probes(&app, &id).await;
    let steady = wait_for_a_later_second(&app, &id).await;
    assert!(is_healthy(&steady), "{steady}");
    assert_eq!(
        steady["updated_at"], probed["updated_at"],
        "checks that change nothing shown leave updated_at alone: {steady}"
    );

    fake.set_node_online("pve3", false);
    let degraded =
        wait_for_cluster_skipping_stale(&app, &id, "degraded", |c| c["status"] == "degraded").await;
    assert_eq!(degraded["status_reason"], "node_offline", "{degraded}");
    assert_eq!(degraded["node_count"], 3, "{degraded}");
    assert_eq!(degraded["nodes_online"], 2, "{degraded}");
    assert_eq!(degraded["quorate"], true, "{degraded}");
    assert_eq!(degraded["last_error"], Value::Null, "{degraded}");
    assert!(
        timestamp(&degraded, "updated_at") > timestamp(&steady, "updated_at"),
        "updated_at moves with the status: {steady} then {degraded}"
    );

    // Monitoring goes on while degraded: last_checked_at moves, updated_at does not.
    let later = wait_for_cluster_skipping_stale(&app, &id, "a later check while degraded", |c| {
        timestamp(c, "last_checked_at") > timestamp(&degraded, "last_checked_at")
    })
    .await;
    assert_eq!(later["status"], "degraded", "{later}");
    assert_eq!(later["updated_at"], degraded["updated_at"], "{later}");

    fake.set_node_online("pve3", true);
    let back = wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
    assert_eq!(back["nodes_online"], 3, "{back}");
    assert_eq!(back["node_count"], 3, "{back}");
    assert!(
        timestamp(&back, "updated_at") > timestamp(&degraded, "updated_at"),
        "{degraded} then {back}"
    );
    assert!(
        timestamp(&back, "last_checked_at") >= timestamp(&later, "last_checked_at"),
        "{later} then {back}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_makes_the_cluster_unhealthy_until_quorum_returns() {
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "quorum").await;

    // Two of three nodes gone: the survivor has no majority.
    fake.set_node_online("pve2", false);
    fake.set_node_online("pve3", false);
    let lost = wait_for_cluster_skipping_stale(&app, &id, "quorum lost", |c| {
        c["status_reason"] == "quorum_lost"
    })
    .await;
    assert_eq!(lost["status"], "unhealthy", "{lost}");
    assert_eq!(lost["quorate"], false, "{lost}");
    assert_eq!(lost["nodes_online"], 1, "{lost}");
    assert_eq!(lost["node_count"], 3, "{lost}");
    // Proxmox answered; nothing failed.
    assert_eq!(lost["last_error"], Value::Null, "{lost}");

    fake.set_node_online("pve2", true);
    fake.set_node_online("pve3", true);
    let back = wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
    assert_eq!(back["quorate"], true, "{back}");
    assert_eq!(back["nodes_online"], 3, "{back}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_proxmox_is_unhealthy_only_after_the_failure_threshold() {
    let fake = fake_pve().await;
    // A longer interval than elsewhere: between the first failure and the third there are two
    // whole intervals (800 ms) for the 20 ms polling below to see the first one.
    let app = daemon_checking_every("400ms", "1s")
        .env("PROXMOXER_MONITOR_FAILURE_THRESHOLD", "3")
        .spawn()
        .await;
    let id = register_fake_id(&app, &fake, "goes-down").await;

    fake.set_down(true);
    let first_failure = wait_for_cluster_skipping_stale(&app, &id, "a failed check", |c| {
        !c["last_error"].is_null()
    })
    .await;
    assert!(
        has_status(&first_failure, "healthy", "ok"),
        "fewer failures than the threshold keep the last status: {first_failure}"
    );

    let down =
        wait_for_cluster_skipping_stale(&app, &id, "unhealthy", |c| c["status"] == "unhealthy")
            .await;
    assert_eq!(down["status_reason"], "unreachable", "{down}");
    let error = down["last_error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "last_error says why: {down}");
    // What was last seen of the cluster stays.
    assert_eq!(down["node_count"], 3, "{down}");
    assert_eq!(down["proxmox_version"], "8.4.1", "{down}");

    fake.set_down(false);
    let back = wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
    assert_eq!(back["last_error"], Value::Null, "{back}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxmox_answering_5xx_is_unhealthy_after_the_threshold_and_heals_when_it_answers() {
    const THRESHOLD: u64 = 3;
    let fake = fake_pve().await;
    let app = daemon_checking_every("400ms", "1s")
        .env("PROXMOXER_MONITOR_FAILURE_THRESHOLD", THRESHOLD.to_string())
        .spawn()
        .await;
    let id = register_fake_id(&app, &fake, "no-quorum-500").await;

    let baseline = fake.total_requests();
    fake.fail_all(Some((500, "cluster not ready - no quorum?")));
    // Every snapshot is checked against the fake's counter read after it: each failed check
    // the snapshot reflects sent at least one request before. At most one request counted
    // before `baseline` can have been answered 500 too (one check was in flight), hence `+ 1`.
    let mut below_threshold = Vec::new();
    let mut too_early = Vec::new();
    let mut last = Value::Null;
    let unhealthy = wait_until(
        async || {
            let snapshot = fetch_cluster(&app, &id).await;
            let failed_requests = fake.total_requests() - baseline;
            let unhealthy = snapshot["status"] == "unhealthy";
            if unhealthy && failed_requests + 1 < THRESHOLD {
                too_early.push((failed_requests, snapshot.clone()));
            }
            if !unhealthy && !snapshot["last_error"].is_null() {
                below_threshold.push(snapshot.clone());
            }
            last = snapshot;
            unhealthy
        },
        WAIT,
    )
    .await;
    assert!(unhealthy, "never became unhealthy; last seen: {last:#}");
    assert!(
        too_early.is_empty(),
        "unhealthy before {THRESHOLD} failed checks: {too_early:?}"
    );
    assert!(
        !below_threshold.is_empty(),
        "a failure below the threshold was never seen; last seen: {last:#}"
    );
    for snapshot in &below_threshold {
        assert!(
            has_status(snapshot, "healthy", "ok"),
            "below the threshold the last status stays: {snapshot}"
        );
    }
    // A 5xx means Proxmox cannot serve us right now, like a refused connection.
    assert_eq!(last["status_reason"], "unreachable", "{last}");
    let error = last["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("500") && error.contains("cluster not ready - no quorum?"),
        "last_error carries Proxmox's status and reason: {last}"
    );

    fake.fail_all(None);
    wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
}

/// Samples the cluster until `done` holds on a snapshot, then for `extra` more; returns every
/// snapshot seen. Panics if `done` never holds within [`WAIT`].
async fn sample_until(
    app: &TestApp,
    id: &str,
    what: &str,
    mut done: impl FnMut(&Value) -> bool,
    extra: Duration,
) -> Vec<Value> {
    let mut samples: Vec<Value> = Vec::new();
    let held = wait_until(
        async || {
            let snapshot = fetch_cluster(app, id).await;
            let held = done(&snapshot);
            samples.push(snapshot);
            held
        },
        WAIT,
    )
    .await;
    assert!(
        held,
        "timed out after {WAIT:?} waiting for {what}; last seen: {:#}",
        samples.last().unwrap_or(&Value::Null)
    );
    let until = tokio::time::Instant::now() + extra;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        samples.push(fetch_cluster(app, id).await);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_proxmox_is_unhealthy_with_reason_timeout() {
    let fake = fake_pve().await;
    // Checks time out well within the interval, so each one completes before the next is due.
    let app = daemon_checking_every("500ms", "200ms").spawn().await;
    let id = register_fake_id(&app, &fake, "hangs").await;

    fake.set_latency(Duration::from_secs(3));
    // Three more intervals after the status turns: it must stay put, never flip to unknown.
    let samples = sample_until(
        &app,
        &id,
        "unhealthy",
        |c| c["status"] == "unhealthy",
        Duration::from_millis(1500),
    )
    .await;
    let last = samples.last().expect("samples");
    assert!(has_status(last, "unhealthy", "timeout"), "{last}");
    assert_eq!(last["last_error"], "timed out after 200ms", "{last}");
    for sample in &samples {
        assert!(
            has_status(sample, "healthy", "ok") || has_status(sample, "unhealthy", "timeout"),
            "a monitor waiting on a timeout is neither stuck nor stale: {sample}"
        );
    }

    fake.set_latency(Duration::ZERO);
    wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxmox_slower_than_three_intervals_settles_on_timeout_without_flapping_to_stale() {
    let fake = fake_pve().await;
    // A valid configuration: nothing requires the timeout to fit in the interval.
    let app = daemon_checking_every("300ms", "1s").spawn().await;
    let id = register_fake_id(&app, &fake, "slow-hang").await;

    fake.set_latency(Duration::from_secs(5));
    // Three more checks (each takes the 1 s timeout) after the status turns.
    let samples = sample_until(
        &app,
        &id,
        "unhealthy",
        |c| c["status"] == "unhealthy",
        Duration::from_secs(3),
    )
    .await;
    let flaps: Vec<&Value> = samples
        .iter()
        .filter(|s| !(has_status(s, "healthy", "ok") || has_status(s, "unhealthy", "timeout")))
        .collect();
    assert!(
        flaps.is_empty(),
        "the monitor kept checking, yet the cluster showed: {flaps:#?}"
    );
    let last = samples.last().expect("samples");
    assert!(has_status(last, "unhealthy", "timeout"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_ticket_costs_one_login_and_the_cluster_stays_healthy() {
    let fake = fake_pve().await;
    // 300 ms: the stale window (3 intervals) is far longer than the re-login check takes.
    let app = daemon("300ms").await;
    let id = register_fake_id(&app, &fake, "relogin").await;
    wait_for_fake("monitor checks", || fake.requests(STATUS_PATH) >= 3).await;
    let logins = fake.logins();
    assert_eq!(logins, 1, "the monitor reuses the registration's ticket");

    fake.invalidate_tickets();
    let mut samples = Vec::new();
    let mut after_relogin = None;
    let done = wait_until(
        async || {
            samples.push(fetch_cluster(&app, &id).await);
            if fake.logins() == logins {
                return false;
            }
            let mark = *after_relogin.get_or_insert(fake.requests(STATUS_PATH));
            // A few checks with the new ticket.
            fake.requests(STATUS_PATH) >= mark + 3
        },
        WAIT,
    )
    .await;
    assert!(
        done,
        "no re-login and further checks; logins {}",
        fake.logins()
    );
    for sample in &samples {
        assert!(is_healthy(sample), "status left healthy: {sample}");
    }
    assert_eq!(fake.logins(), logins + 1, "exactly one new login");
    assert_eq!(fake.failed_logins(), 0);
    assert!(is_healthy(&fetch_cluster(&app, &id).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_makes_the_cluster_unhealthy_and_failed_logins_back_off() {
    // pveproxy's 3 s delay on every 401 would by itself space the logins out; shortened, only
    // the daemon's back-off stands between a changed password and a fail2ban ban.
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "rotated").await;

    // Tickets outlive a password change on Proxmox; the daemon finds out at its next login,
    // forced here as a key rotation would force it.
    fake.set_password(DEFAULT_USER, "changed-by-someone-else");
    fake.invalidate_tickets();
    let rejected = wait_for_cluster_skipping_stale(&app, &id, "auth_failed", |c| {
        c["status_reason"] == "auth_failed"
    })
    .await;
    assert_eq!(rejected["status"], "unhealthy", "{rejected}");
    let error = rejected["last_error"].as_str().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("authentication"),
        "last_error says authentication failed: {rejected}"
    );
    let failed_at_start = fake.failed_logins();
    assert!(failed_at_start >= 1);

    // Watch 30 intervals. Logging in on every check would fail ~30 times; the back-off
    // (2 intervals, doubling) allows about 3 more attempts in this window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed = fake.failed_logins();
    assert!(
        failed <= 5,
        "{failed} failed logins in 30 intervals ({failed_at_start} at the start): no back-off"
    );
    wait_for_cluster_skipping_stale(&app, &id, "still auth_failed", |c| {
        has_status(c, "unhealthy", "auth_failed")
    })
    .await;

    // The back-off has grown to a few seconds by now; the next attempt heals.
    fake.set_password(DEFAULT_USER, DEFAULT_PASSWORD);
    let back = wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
    assert_eq!(back["last_error"], Value::Null, "{back}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitors_reuse_their_ticket_instead_of_logging_in_on_every_check() {
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "ticket-reuse").await;

    // One request was the registration probe; at least 20 more are monitor checks.
    wait_for_fake("21 cluster/status requests", || {
        fake.requests(STATUS_PATH) >= 21
    })
    .await;
    let logins = fake.logins();
    assert!(
        (1..=2).contains(&logins),
        "{logins} logins for {} checks",
        fake.requests(STATUS_PATH)
    );
    assert!(fake.requests(TICKET_PATH) <= 2);
    assert_eq!(fake.failed_logins(), 0);
    wait_for_cluster_skipping_stale(&app, &id, "healthy", is_healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_probe_is_the_first_check_and_the_next_comes_an_interval_later() {
    let fake = fake_pve().await;
    let app = daemon("2s").await;
    let registered = register_fake(&app, &fake, "probed-once").await;
    let id = registered["id"].as_str().expect("id").to_owned();

    // The first round (within the start-up spread) probes the members the registration did
    // not reach, and asks the registered node nothing it has just answered.
    let probed = wait_for_member_probes(&app, &id).await;
    assert_eq!(fake.requests(STATUS_PATH), 1, "the registration's own call");
    assert_eq!(
        fake.requests(VERSION_PATH),
        1,
        "the registration's own call"
    );
    assert_eq!(probed["active_endpoint"], registered["api_endpoint"]);
    assert_eq!(probed["status"], "healthy");

    wait_for_fake("the next check", || fake.requests(STATUS_PATH) >= 2).await;
    let checked = wait_for_a_later_second(&app, &id).await;
    assert!(timestamp(&checked, "last_checked_at") > timestamp(&registered, "last_checked_at"));
    assert_eq!(
        fake.logins(),
        1,
        "the monitor goes on with the probe's ticket"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_sys_audit_makes_the_cluster_forbidden_until_it_is_granted_again() {
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "auditor").await;

    fake.deny_sys_audit(DEFAULT_USER);
    let denied = wait_for_cluster_skipping_stale(&app, &id, "forbidden", |c| {
        c["status_reason"] == "forbidden"
    })
    .await;
    assert_eq!(denied["status"], "unhealthy", "{denied}");
    let error = denied["last_error"].as_str().unwrap_or_default();
    assert!(
        error.to_lowercase().contains("permission"),
        "last_error names the missing permission: {denied}"
    );

    fake.grant_sys_audit(DEFAULT_USER);
    wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cluster_stops_its_monitor() {
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "to-delete").await;
    wait_for_fake("monitor checks", || fake.requests(STATUS_PATH) >= 4).await;

    assert_eq!(
        app.delete_cluster(&id).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.get_cluster(&id).await.status(), StatusCode::NOT_FOUND);

    // Absence of requests can only be observed over time: let 5 intervals pass for anything
    // in flight at the delete, then watch 10 more intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let checks = fake.requests(STATUS_PATH);
    let total = fake.total_requests();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fake.requests(STATUS_PATH),
        checks,
        "cluster/status still polled after delete"
    );
    assert_eq!(fake.total_requests(), total, "Proxmox still called");

    let health: Value = app.get_health().await.json().await.expect("health JSON");
    assert_eq!(health["clusters"], 0, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_resumes_monitoring_every_cluster() {
    let mut app = daemon("100ms").await;
    let fakes = [fake_pve().await, fake_pve().await, fake_pve().await];
    let mut ids = Vec::new();
    for (index, fake) in fakes.iter().enumerate() {
        ids.push(register_fake_id(&app, fake, &format!("resume-{index}")).await);
    }
    for fake in &fakes {
        wait_for_fake("monitor checks", || fake.requests(STATUS_PATH) >= 3).await;
    }
    let logins_before: Vec<u64> = fakes.iter().map(FakePve::logins).collect();

    app.restart().await;
    // The old process has exited: every request counted from here on is the new one's.
    let checks_at_restart: Vec<u64> = fakes.iter().map(|f| f.requests(STATUS_PATH)).collect();
    let list = list_clusters(&app).await;
    assert_eq!(list["total"], 3, "{list}");
    for listed in list["clusters"].as_array().expect("clusters array") {
        // Nothing is known until the new monitor reports, which may already have happened.
        assert!(
            has_status(listed, "unknown", "not_checked") || has_status(listed, "healthy", "ok"),
            "{listed}"
        );
    }

    for ((id, fake), checks) in ids.iter().zip(&fakes).zip(&checks_at_restart) {
        wait_for_cluster_skipping_stale(&app, id, "healthy after the restart", is_healthy).await;
        wait_for_fake("checks after the restart", || {
            fake.requests(STATUS_PATH) >= checks + 2
        })
        .await;
    }
    for (fake, before) in fakes.iter().zip(&logins_before) {
        // The new process has no ticket: it logs in (once) for its monitor.
        assert!(
            fake.logins() > *before,
            "no login after the restart: {} then {}",
            before,
            fake.logins()
        );
        assert_eq!(fake.failed_logins(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxmox_upgrade_shows_after_the_next_login() {
    let fake = fake_pve().await;
    let app = daemon("100ms").await;
    let id = register_fake_id(&app, &fake, "upgrade").await;
    let before = wait_for_a_later_second(&app, &id).await;
    assert_eq!(before["proxmox_version"], "8.4.1", "{before}");
    let version_reads = fake.requests(VERSION_PATH);

    // An upgrade restarts pveproxy and rotates its key, which voids every ticket.
    fake.set_version("9.0.3");
    fake.invalidate_tickets();
    let upgraded = wait_for_cluster_skipping_stale(&app, &id, "version 9.0.3", |c| {
        c["proxmox_version"] == "9.0.3"
    })
    .await;
    assert!(is_healthy(&upgraded), "{upgraded}");
    assert!(
        timestamp(&upgraded, "updated_at") > timestamp(&before, "updated_at"),
        "updated_at moves with the version: {before} then {upgraded}"
    );
    assert!(fake.requests(VERSION_PATH) > version_reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_are_logged_with_the_cluster_name_and_the_password_never_is() {
    const USER: &str = "monitor@pve";
    const PASSWORD: &str = "Pw-7c1e9a4b-must-never-be-logged";
    const NAME: &str = "logged-cluster";
    let fake = fake_pve().await;
    fake.add_user(USER, PASSWORD);
    let app = daemon("100ms").await;
    let body = json!({
        "name": NAME,
        "api_endpoint": fake.url(),
        "username": USER,
        "password": PASSWORD,
    });
    let id = id_of(&register(&app, &body).await);

    fake.set_node_online("pve2", false);
    wait_for_cluster_skipping_stale(&app, &id, "degraded", |c| c["status"] == "degraded").await;
    fake.set_node_online("pve2", true);
    wait_for_cluster_skipping_stale(&app, &id, "healthy again", is_healthy).await;
    // A re-login and a rejected login: the paths that handle the password.
    let logins = fake.logins();
    fake.invalidate_tickets();
    wait_for_fake("a re-login", || fake.logins() > logins).await;
    fake.set_password(USER, "rotated");
    fake.invalidate_tickets();
    wait_for_cluster_skipping_stale(&app, &id, "auth_failed", |c| {
        c["status_reason"] == "auth_failed"
    })
    .await;

    for change in [
        "healthy -> degraded",
        "degraded -> healthy",
        "healthy -> unhealthy",
    ] {
        let logged = wait_until(
            async || {
                app.logs().lines().any(|line| {
                    line.contains(" INFO ") && line.contains(change) && line.contains(NAME)
                })
            },
            WAIT,
        )
        .await;
        assert!(
            logged,
            "no INFO line with {change:?} and {NAME:?}:\n{}",
            app.logs()
        );
    }
    let logs = app.all_logs();
    assert!(!logs.contains(PASSWORD), "the password is in the logs");
    let list = app.get_clusters().await.text().await.expect("list body");
    assert!(!list.contains(PASSWORD), "the password is in the API");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_results_survive_a_crash_and_the_status_is_rechecked_after_restart() {
    let fake = fake_pve().await;
    let mut app = daemon_checking_every("100ms", "5s").spawn().await;
    let id = register_fake_id(&app, &fake, "persisted").await;

    // A fourth node joins while offline, and Proxmox is upgraded (seen after the next login).
    fake.set_cluster(
        "prod",
        &[
            ("pve1", true),
            ("pve2", true),
            ("pve3", true),
            ("pve4", false),
        ],
    );
    fake.set_version("9.0.3");
    fake.invalidate_tickets();
    let seen = wait_for_cluster_skipping_stale(&app, &id, "degraded with 4 nodes on 9.0.3", |c| {
        c["status"] == "degraded"
            && c["node_count"] == 4
            && c["nodes_online"] == 3
            && c["proxmox_version"] == "9.0.3"
            // The new node is discovered and tried too, which is a change of its own.
            && c["members"].as_array().is_some_and(|members| {
                members.len() == 4 && members.iter().all(|m| !m["reachable"].is_null())
            })
    })
    .await;

    // Monitor results are written every 2 s, and nothing shows when: wait out more than one
    // flush period, then crash without the shutdown flush.
    tokio::time::sleep(Duration::from_secs(3)).await;
    app.kill9().await;

    // Slow answers keep the first check after the restart from completing for a while.
    fake.set_latency(Duration::from_secs(2));
    app.restart().await;
    let loaded = fetch_cluster(&app, &id).await;
    assert!(has_status(&loaded, "unknown", "not_checked"), "{loaded}");
    assert_eq!(loaded["node_count"], 4, "{loaded}");
    assert_eq!(loaded["nodes_online"], 3, "{loaded}");
    assert_eq!(loaded["quorate"], true, "{loaded}");
    assert_eq!(loaded["proxmox_version"], "9.0.3", "{loaded}");
    assert_eq!(loaded["updated_at"], seen["updated_at"], "{loaded}");
    assert_eq!(loaded["created_at"], seen["created_at"], "{loaded}");

    // The status now comes from the live Proxmox, where the fourth node is up.
    fake.set_latency(Duration::ZERO);
    fake.set_node_online("pve4", true);
    let live =
        wait_for_cluster_skipping_stale(&app, &id, "healthy from the live fake", is_healthy).await;
    assert_eq!(live["node_count"], 4, "{live}");
    assert_eq!(live["nodes_online"], 4, "{live}");
}
