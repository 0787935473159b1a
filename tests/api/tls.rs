//! Proxmox over HTTPS, as a stock node serves it: a node certificate from the node's own cluster
//! CA, which nothing trusts. Operators pin the node's SHA-256 fingerprint, trust the cluster CA
//! with `tls.ca_file`, or opt in to `tls.insecure_skip_verify`; everything else is refused with
//! the presented fingerprint, and a certificate that changes under a pin is never trusted
//! silently.
//!
//! Every certificate is generated in the test by [`FakePve::start_tls`]. Monitoring tests use
//! short intervals; conditions are awaited with bounded polling, and the few fixed sleeps observe
//! that something does *not* happen, over a window measured in monitor intervals.

use std::process::Output;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakePve};
use crate::helpers::describe;
use crate::helpers::{
    STATUS_PATH, TICKET_PATH, TestApp, TestAppBuilder, WAIT, assert_status_read_with_token,
    cluster_count, daemon_checking_every, fast_daemon, fetch_cluster, has_status, id_of,
    is_healthy, list_clusters, register, register_body, register_body_at, register_fake,
    register_fake_id, timestamp, tls_fake, wait_for_cluster_skipping_stale, wait_until,
};

const TOKEN_USER: &str = "monitor@pve";
const TOKEN_NAME: &str = "monitoring";
const TOKEN_SECRET: &str = "5d7c1f0e-aaaa-4bbb-8ccc-1234567890ab";
/// A well-formed fingerprint no fake ever presents.
const FOREIGN_FINGERPRINT: &str = "3A:9F:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:BA";

// --- helpers ------------------------------------------------------------------------------------

/// Writes the fake's cluster CA (`pve-root-ca.pem`) into the daemon's data directory and points
/// `PROXMOXER_TLS_CA_FILE` at it.
fn trusting_ca(builder: TestAppBuilder, fake: &FakePve) -> TestAppBuilder {
    let path = builder.data_dir().join("pve-root-ca.pem");
    std::fs::write(&path, fake.ca_pem()).expect("write the CA file");
    builder.env("PROXMOXER_TLS_CA_FILE", path.display().to_string())
}

/// The default credentials for `fake` with `fingerprint` pinned.
fn pinned_body(fake: &FakePve, name: &str, fingerprint: &str) -> Value {
    let mut body = register_body(fake, name);
    body["fingerprint"] = json!(fingerprint);
    body
}

/// The fake's API token with `fingerprint` pinned.
fn pinned_token_body(fake: &FakePve, name: &str, fingerprint: &str) -> Value {
    json!({
        "name": name,
        "api_endpoint": fake.url(),
        "username": TOKEN_USER,
        "token_id": TOKEN_NAME,
        "token_secret": TOKEN_SECRET,
        "fingerprint": fingerprint,
    })
}

/// How PDM and some tools show a fingerprint: lower case, no colons.
fn bare_lowercase(fingerprint: &str) -> String {
    fingerprint.replace(':', "").to_lowercase()
}

/// Expects `502 {"code":"BadGateway","message":"Failed to connect to Proxmox",...}` and returns
/// its `details`.
async fn bad_gateway_details(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.expect("error answers JSON");
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["code"], "BadGateway", "{body}");
    assert_eq!(body["message"], "Failed to connect to Proxmox", "{body}");
    body["details"].clone()
}

/// Expects `400` with `message` about the `fingerprint` field.
async fn expect_fingerprint_rejected(response: reqwest::Response, message: &str, sent: &Value) {
    let status = response.status();
    let body: Value = response.json().await.expect("error answers JSON");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{sent} -> {body}");
    assert_eq!(body["code"], "BadRequest", "{sent} -> {body}");
    assert_eq!(body["message"], message, "{sent} -> {body}");
    assert_eq!(body["details"]["field"], "fingerprint", "{sent} -> {body}");
}

/// Waits until the fake has answered `more` further cluster status reads (monitor checks),
/// asserting that the cluster showed healthy all along and still does.
async fn stays_healthy_over_checks(app: &TestApp, fake: &FakePve, id: &str, more: u64) {
    let start = fake.requests(STATUS_PATH);
    let mut samples = Vec::new();
    let done = wait_until(
        async || {
            samples.push(fetch_cluster(app, id).await);
            fake.requests(STATUS_PATH) >= start + more
        },
        WAIT,
    )
    .await;
    assert!(
        done,
        "fewer than {more} checks within {WAIT:?}: {} then {}",
        start,
        fake.requests(STATUS_PATH)
    );
    let last =
        wait_for_cluster_skipping_stale(app, id, "healthy after the checks", is_healthy).await;
    assert!(!last["last_checked_at"].is_null(), "{last}");
    for sample in &samples {
        assert!(
            is_healthy(sample) || sample["status_reason"] == "stale",
            "left healthy while checking: {sample}"
        );
    }
}

/// Runs `proxmoxer fingerprint <url>` (blocking, off the runtime that serves the fake).
async fn fingerprint_command(url: String) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_proxmoxer"))
            .args(["fingerprint", &url])
            .env_remove("PROXMOXER_CONFIG")
            .output()
            .expect("run proxmoxer fingerprint")
    })
    .await
    .expect("the fingerprint command thread")
}

// --- pinning at registration --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_fingerprint_in_the_gui_form_registers_and_the_cluster_is_monitored_healthy() {
    let fake = tls_fake().await;
    let fingerprint = fake.certificate_fingerprint();
    let app = fast_daemon().spawn().await;

    let created = register(&app, &pinned_body(&fake, "pinned", &fingerprint)).await;
    assert_eq!(created["fingerprint"], fingerprint.as_str(), "{created}");
    assert_eq!(created["auth_method"], "password", "{created}");
    assert_eq!(created["api_endpoint"], fake.url(), "{created}");
    assert_eq!(created["node_count"], 3, "{created}");
    assert_eq!(created["proxmox_version"], "8.4.1", "{created}");
    let id = id_of(&created);

    stays_healthy_over_checks(&app, &fake, &id, 5).await;
    let shown = fetch_cluster(&app, &id).await;
    assert_eq!(shown["fingerprint"], fingerprint.as_str(), "{shown}");
    let list = list_clusters(&app).await;
    assert_eq!(
        list["clusters"][0]["fingerprint"],
        fingerprint.as_str(),
        "{list}"
    );
    // The monitor reuses the registration's ticket over the pinned connection.
    assert_eq!(fake.logins(), 1);
    assert_eq!(fake.failed_logins(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_is_accepted_in_any_case_with_or_without_colons_and_shown_in_the_gui_form() {
    let fake = tls_fake().await;
    let fingerprint = fake.certificate_fingerprint();
    let app = fast_daemon().spawn().await;

    let forms = [
        ("lower-bare", bare_lowercase(&fingerprint)),
        ("upper-bare", fingerprint.replace(':', "")),
        ("lower-colons", fingerprint.to_lowercase()),
    ];
    let mut ids = Vec::new();
    for (name, form) in forms {
        let created = register(&app, &pinned_body(&fake, name, &form)).await;
        assert_eq!(created["fingerprint"], fingerprint.as_str(), "{form}");
        let id = id_of(&created);
        assert_eq!(
            fetch_cluster(&app, &id).await["fingerprint"],
            fingerprint.as_str()
        );
        ids.push(id);
    }
    // The pin applies at every check too, whichever form it was given in.
    for id in &ids {
        wait_for_cluster_skipping_stale(&app, id, "a healthy check", |c| {
            is_healthy(c) && !c["last_checked_at"].is_null()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_is_trusted_whichever_host_name_the_endpoint_uses() {
    let fake = tls_fake().await;
    let fingerprint = fake.certificate_fingerprint();
    let app = fast_daemon().spawn().await;
    let port = fake.addr().port();

    for (name, endpoint) in [
        ("by-name", format!("https://localhost:{port}")),
        ("by-address", format!("https://127.0.0.1:{port}")),
    ] {
        let mut body = register_body_at(&endpoint, name);
        body["fingerprint"] = json!(fingerprint);
        let created = register(&app, &body).await;
        assert_eq!(created["api_endpoint"], endpoint.as_str(), "{created}");
        stays_healthy_over_checks(&app, &fake, &id_of(&created), 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_self_signed_node_certificate_is_trusted_without_any_chain() {
    let fake = tls_fake().await;
    // Regenerated by hand: signed by nobody the daemon could know.
    fake.replace_with_self_signed();
    let fingerprint = fake.certificate_fingerprint();
    let app = fast_daemon().spawn().await;

    let created = register(&app, &pinned_body(&fake, "self-signed", &fingerprint)).await;
    assert_eq!(created["fingerprint"], fingerprint.as_str(), "{created}");
    stays_healthy_over_checks(&app, &fake, &id_of(&created), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_502_with_the_presented_fingerprint_and_no_credentials_are_sent() {
    let fake = tls_fake().await;
    let app = TestApp::spawn().await;

    let response = app
        .post_clusters(&pinned_body(&fake, "wrong-pin", FOREIGN_FINGERPRINT))
        .await;
    let details = bad_gateway_details(response).await;
    assert_eq!(details["reason"], "certificate not trusted", "{details}");
    assert_eq!(
        details["fingerprint"],
        fake.certificate_fingerprint().as_str(),
        "the presented fingerprint, in the GUI form: {details}"
    );
    let error = details["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(FOREIGN_FINGERPRINT),
        "the error names the pinned fingerprint: {details}"
    );
    assert_eq!(
        fake.total_requests(),
        0,
        "nothing was sent to a server that failed the pin"
    );
    assert_eq!(cluster_count(&app).await, 0);
    assert!(!app.logs().contains(DEFAULT_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_in_lower_case_is_502_too() {
    let fake = tls_fake().await;
    let app = TestApp::spawn().await;
    let response = app
        .post_clusters(&pinned_body(
            &fake,
            "wrong-pin",
            &bare_lowercase(FOREIGN_FINGERPRINT),
        ))
        .await;
    let details = bad_gateway_details(response).await;
    assert_eq!(details["reason"], "certificate not trusted", "{details}");
    assert_eq!(
        details["fingerprint"],
        fake.certificate_fingerprint().as_str(),
        "{details}"
    );
    assert_eq!(fake.total_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_pin_an_untrusted_certificate_is_502_showing_the_fingerprint_to_pin() {
    let fake = tls_fake().await;
    let app = fast_daemon().spawn().await;

    let response = app.post_clusters(&register_body(&fake, "stock")).await;
    let details = bad_gateway_details(response).await;
    let presented = fake.certificate_fingerprint();
    assert_eq!(details["reason"], "certificate not trusted", "{details}");
    assert_eq!(details["fingerprint"], presented.as_str(), "{details}");
    let error = details["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("UnknownIssuer"),
        "the error says why the chain failed: {details}"
    );
    assert_eq!(fake.total_requests(), 0, "no credentials before trust");
    assert_eq!(cluster_count(&app).await, 0);

    // The documented way out: compare, then register again with the shown fingerprint pinned.
    let created = register(&app, &pinned_body(&fake, "stock", &presented)).await;
    assert_eq!(created["fingerprint"], presented.as_str(), "{created}");
    stays_healthy_over_checks(&app, &fake, &id_of(&created), 3).await;
    assert!(
        !app.logs().contains("insecure_skip_verify"),
        "verification is not skipped by default:\n{}",
        app.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_endpoint_that_speaks_plain_http_is_502_without_a_fingerprint() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let endpoint = fake.url().replacen("http://", "https://", 1);
    let response = app
        .post_clusters(&register_body_at(&endpoint, "no-tls"))
        .await;
    let details = bad_gateway_details(response).await;
    let reason = details["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("TLS"), "{details}");
    assert!(
        details.get("fingerprint").is_none(),
        "nothing was presented: {details}"
    );
    assert_eq!(fake.logins() + fake.failed_logins(), 0);
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_on_an_http_endpoint_is_400() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let body = pinned_body(&fake, "plain", FOREIGN_FINGERPRINT);
    expect_fingerprint_rejected(
        app.post_clusters(&body).await,
        "Fingerprint needs an https endpoint",
        &body,
    )
    .await;
    assert_eq!(fake.total_requests(), 0);
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_fingerprint_is_400_naming_the_field() {
    let fake = tls_fake().await;
    let app = TestApp::spawn().await;
    let good = fake.certificate_fingerprint();
    let bare = good.replace(':', "");
    let malformed = [
        String::new(),
        "3A:9F".to_owned(),
        // 31 and 33 bytes.
        good[..good.len() - 3].to_owned(),
        format!("{good}:00"),
        // 63 and 65 hex digits.
        bare[..63].to_owned(),
        format!("{bare}0"),
        // Not hex.
        format!("ZZ{}", &good[2..]),
        // A SHA-1 fingerprint.
        good[..59].to_owned(),
        // Pairs split by spaces or dashes.
        good.replace(':', " "),
        good.replace(':', "-"),
    ];
    for fingerprint in malformed {
        let body = pinned_body(&fake, "malformed", &fingerprint);
        let response = app.post_clusters(&body).await;
        expect_fingerprint_rejected(response, "Fingerprint is invalid", &body).await;
    }

    let mut body = pinned_body(&fake, "malformed", &good);
    body["fingerprint"] = json!(42);
    expect_fingerprint_rejected(
        app.post_clusters(&body).await,
        "Field fingerprint must be a string",
        &body,
    )
    .await;

    assert_eq!(fake.total_requests(), 0, "nothing invalid reaches Proxmox");
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpinned_cluster_shows_a_null_fingerprint() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let created = register_fake(&app, &fake, "plain").await;
    assert!(created["fingerprint"].is_null(), "{created}");
    assert!(
        created
            .as_object()
            .expect("object")
            .contains_key("fingerprint"),
        "fingerprint is shown, as null: {created}"
    );
}

// --- API tokens over pinned HTTPS ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_registers_and_is_monitored_over_pinned_https_without_any_ticket_login() {
    let fake = tls_fake().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let fingerprint = fake.certificate_fingerprint();
    let app = fast_daemon().spawn().await;

    let created = register(&app, &pinned_token_body(&fake, "token", &fingerprint)).await;
    assert_eq!(created["auth_method"], "token", "{created}");
    assert_eq!(created["fingerprint"], fingerprint.as_str(), "{created}");
    assert!(!created.to_string().contains(TOKEN_SECRET));

    assert_status_read_with_token(&fake, TOKEN_USER, TOKEN_NAME, TOKEN_SECRET);

    stays_healthy_over_checks(&app, &fake, &id_of(&created), 5).await;
    assert_eq!(
        fake.logins() + fake.failed_logins(),
        0,
        "a token never logs in"
    );
    assert_eq!(fake.requests(TICKET_PATH), 0);
    assert!(!app.logs().contains(TOKEN_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_pinned_https_a_token_without_privileges_is_403() {
    let fake = tls_fake().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, false);
    let app = TestApp::spawn().await;

    let body = pinned_token_body(&fake, "token", &fake.certificate_fingerprint());
    let response = app.post_clusters(&body).await;
    let status = response.status();
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
    assert_eq!(error["message"], "Insufficient privileges on Proxmox");
    assert_eq!(error["details"]["privilege"], "Sys.Audit", "{error}");
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_pinned_https_a_two_factor_account_is_401_pointing_to_tokens() {
    let fake = tls_fake().await;
    fake.set_two_factor(DEFAULT_USER, true);
    let app = TestApp::spawn().await;

    let body = pinned_body(&fake, "tfa", &fake.certificate_fingerprint());
    let response = app.post_clusters(&body).await;
    let status = response.status();
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{error}");
    assert_eq!(error["message"], "Authentication failed", "{error}");
    let reason = error["details"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("two-factor") && reason.contains("token"),
        "{error}"
    );
    assert_eq!(cluster_count(&app).await, 0);
}

// --- a certificate that changes under a pin -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_makes_a_pinned_cluster_unhealthy_until_it_is_registered_again() {
    const THRESHOLD: u32 = 3;
    let fake = tls_fake().await;
    let old = fake.certificate_fingerprint();
    // 400 ms: between the first failure and the third there are two whole intervals for the
    // 20 ms polling below to see the status held below the threshold.
    let app = daemon_checking_every("400ms", "2s")
        .env("PROXMOXER_MONITOR_FAILURE_THRESHOLD", THRESHOLD.to_string())
        .spawn()
        .await;
    let id = id_of(&register(&app, &pinned_body(&fake, "renewed", &old)).await);
    wait_for_cluster_skipping_stale(&app, &id, "a first check", |c| {
        is_healthy(c) && !c["last_checked_at"].is_null()
    })
    .await;

    // pveupdate renews the node certificate: same CA, new key, new fingerprint.
    fake.rotate_certificate();
    let new = fake.certificate_fingerprint();
    assert_ne!(new, old);

    let mut below_threshold = Vec::new();
    let mut last = Value::Null;
    let turned = wait_until(
        async || {
            let snapshot = fetch_cluster(&app, &id).await;
            let unhealthy = snapshot["status"] == "unhealthy";
            if !unhealthy && !snapshot["last_error"].is_null() {
                below_threshold.push(snapshot.clone());
            }
            last = snapshot;
            unhealthy
        },
        WAIT,
    )
    .await;
    assert!(turned, "never became unhealthy; last seen: {last:#}");
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
    assert!(has_status(&last, "unhealthy", "tls_error"), "{last:#}");
    let error = last["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate changed")
            && error.contains(&format!("presented SHA-256 fingerprint {new}"))
            && error.contains(&format!("{old} is pinned")),
        "last_error names the change and both fingerprints: {last:#}"
    );
    assert_eq!(last["fingerprint"], old.as_str(), "the pin stays: {last:#}");
    // What was last seen of the cluster stays.
    assert_eq!(last["node_count"], 3, "{last:#}");

    // Nothing is trusted silently: over 5 more intervals it stays unhealthy, and not one request
    // (which would carry the ticket) reaches the server with the unpinned certificate.
    let requests = fake.total_requests();
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let snapshot = fetch_cluster(&app, &id).await;
        assert!(
            has_status(&snapshot, "unhealthy", "tls_error") || snapshot["status_reason"] == "stale",
            "a changed certificate must stay refused: {snapshot:#}"
        );
    }
    let later = wait_for_cluster_skipping_stale(&app, &id, "still tls_error", |c| {
        has_status(c, "unhealthy", "tls_error")
    })
    .await;
    assert!(
        timestamp(&later, "last_checked_at") > timestamp(&last, "last_checked_at"),
        "the monitor kept checking: {last:#} then {later:#}"
    );
    assert_eq!(
        fake.total_requests(),
        requests,
        "requests reached a server whose certificate is not pinned"
    );

    // The operator compares the new fingerprint and registers it under a new name.
    let again = register(&app, &pinned_body(&fake, "renewed-2", &new)).await;
    assert_eq!(again["fingerprint"], new.as_str(), "{again}");
    wait_for_cluster_skipping_stale(
        &app,
        &id_of(&again),
        "the re-registered cluster checked",
        |c| is_healthy(c) && !c["last_checked_at"].is_null(),
    )
    .await;
    let still_pinned_to_old = fetch_cluster(&app, &id).await;
    assert!(
        has_status(&still_pinned_to_old, "unhealthy", "tls_error"),
        "{still_pinned_to_old:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_survives_a_restart_and_a_self_signed_replacement_is_then_a_tls_error() {
    let fake = tls_fake().await;
    let old = fake.certificate_fingerprint();
    let mut app = fast_daemon().spawn().await;
    let id = id_of(
        &register(
            &app,
            &pinned_body(&fake, "restarted", &bare_lowercase(&old)),
        )
        .await,
    );

    app.restart().await;
    let loaded = fetch_cluster(&app, &id).await;
    assert_eq!(loaded["fingerprint"], old.as_str(), "{loaded}");
    let checks = fake.requests(STATUS_PATH);
    let mut last = Value::Null;
    let checked = wait_until(
        async || {
            last = fetch_cluster(&app, &id).await;
            fake.requests(STATUS_PATH) >= checks + 2 && is_healthy(&last)
        },
        WAIT,
    )
    .await;
    assert!(
        checked,
        "the restarted daemon does not check the pinned cluster; last seen: {last:#}"
    );

    fake.replace_with_self_signed();
    let new = fake.certificate_fingerprint();
    let refused = wait_for_cluster_skipping_stale(&app, &id, "tls_error", |c| {
        c["status_reason"] == "tls_error"
    })
    .await;
    assert_eq!(refused["status"], "unhealthy", "{refused:#}");
    let error = refused["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate changed") && error.contains(&new) && error.contains(&old),
        "last_error names the change and both fingerprints: {refused:#}"
    );
}

// --- trusting the cluster CA --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_trusts_the_cluster_ca_signed_node_without_a_pin() {
    let fake = tls_fake().await;
    let app = trusting_ca(fast_daemon(), &fake).spawn().await;

    let created = register_fake(&app, &fake, "by-ca").await;
    assert!(created["fingerprint"].is_null(), "no pin: {created}");
    stays_healthy_over_checks(&app, &fake, &id_of(&created), 5).await;

    // The node certificate names localhost too.
    let by_name = format!("https://localhost:{}", fake.addr().port());
    let created = register(&app, &register_body_at(&by_name, "by-ca-name")).await;
    stays_healthy_over_checks(&app, &fake, &id_of(&created), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_given_in_the_config_file_is_trusted_too() {
    let fake = tls_fake().await;
    let builder = fast_daemon();
    let path = builder.data_dir().join("pve-root-ca.pem");
    std::fs::write(&path, fake.ca_pem()).expect("write the CA file");
    let app = builder
        .config_toml(&format!(
            "[tls]\nca_file = {:?}\n",
            path.display().to_string()
        ))
        .spawn()
        .await;
    register_fake(&app, &fake, "by-ca").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_ca_file_a_renewed_certificate_stays_healthy_and_a_self_signed_one_is_a_tls_error() {
    let fake = tls_fake().await;
    let app = trusting_ca(fast_daemon(), &fake).spawn().await;
    let id = register_fake_id(&app, &fake, "by-ca").await;
    stays_healthy_over_checks(&app, &fake, &id, 2).await;

    // Same CA, new leaf: the fake drops connections that use the old one, so every check from
    // here on handshakes with the new certificate.
    fake.rotate_certificate();
    stays_healthy_over_checks(&app, &fake, &id, 5).await;

    fake.replace_with_self_signed();
    let presented = fake.certificate_fingerprint();
    let refused = wait_for_cluster_skipping_stale(&app, &id, "tls_error", |c| {
        c["status_reason"] == "tls_error"
    })
    .await;
    assert_eq!(refused["status"], "unhealthy", "{refused:#}");
    let error = refused["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate not trusted") && error.contains(&presented),
        "last_error names the untrusted certificate: {refused:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_does_not_override_a_wrong_pin() {
    let fake = tls_fake().await;
    let app = trusting_ca(TestApp::builder(), &fake).spawn().await;
    let response = app
        .post_clusters(&pinned_body(&fake, "wrong-pin", FOREIGN_FINGERPRINT))
        .await;
    let details = bad_gateway_details(response).await;
    assert_eq!(details["reason"], "certificate not trusted", "{details}");
    assert_eq!(
        details["fingerprint"],
        fake.certificate_fingerprint().as_str(),
        "{details}"
    );
    assert_eq!(fake.total_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_file_of_another_cluster_does_not_trust_this_node() {
    let fake = tls_fake().await;
    let other = tls_fake().await;
    let app = trusting_ca(TestApp::builder(), &other).spawn().await;
    let details = bad_gateway_details(app.post_clusters(&register_body(&fake, "x")).await).await;
    assert_eq!(details["reason"], "certificate not trusted", "{details}");
    assert_eq!(
        details["fingerprint"],
        fake.certificate_fingerprint().as_str(),
        "{details}"
    );
    assert_eq!(fake.total_requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unusable_ca_file_stops_the_daemon_at_start_naming_the_key() {
    let scratch = tempfile::tempdir().expect("scratch directory");
    let dir = scratch.path();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").expect("write garbage");
    let broken = dir.join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .expect("write broken PEM");
    let missing = dir.join("missing.pem");

    for path in [missing, garbage, broken] {
        let (status, stderr) = TestApp::builder()
            .env("PROXMOXER_TLS_CA_FILE", path.display().to_string())
            .spawn_expect_failure()
            .await;
        assert!(!status.success());
        assert!(
            stderr.contains("tls.ca_file"),
            "{}: stderr does not name tls.ca_file:\n{stderr}",
            path.display()
        );
        assert!(
            !stderr.contains("listening on"),
            "{}: the daemon listened:\n{stderr}",
            path.display()
        );
    }
}

// --- insecure_skip_verify -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_registers_an_untrusted_node_without_a_pin_and_warns_at_start_and_on_use()
 {
    let fake = tls_fake().await;
    let presented = fake.certificate_fingerprint();
    let app = fast_daemon()
        .env("PROXMOXER_TLS_INSECURE_SKIP_VERIFY", "true")
        .spawn()
        .await;
    let warnings = |app: &TestApp| -> Vec<String> {
        app.logs()
            .lines()
            .filter(|line| line.contains("WARN") && line.contains("insecure_skip_verify"))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        wait_until(async || !warnings(&app).is_empty(), WAIT).await,
        "no warning at start:\n{}",
        app.logs()
    );
    assert!(
        warnings(&app).iter().all(|line| !line.contains(&presented)),
        "nothing was used yet: {:?}",
        warnings(&app)
    );

    let created = register_fake(&app, &fake, "insecure").await;
    assert!(created["fingerprint"].is_null(), "{created}");
    let id = id_of(&created);
    stays_healthy_over_checks(&app, &fake, &id, 3).await;
    assert!(
        wait_until(
            async || warnings(&app).iter().any(|line| line.contains(&presented)),
            WAIT
        )
        .await,
        "no warning naming the unverified certificate on use:\n{}",
        app.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_still_refuses_a_wrong_pin() {
    let fake = tls_fake().await;
    let app = TestApp::builder()
        .env("PROXMOXER_TLS_INSECURE_SKIP_VERIFY", "true")
        .spawn()
        .await;
    let response = app
        .post_clusters(&pinned_body(&fake, "wrong-pin", FOREIGN_FINGERPRINT))
        .await;
    let details = bad_gateway_details(response).await;
    assert_eq!(details["reason"], "certificate not trusted", "{details}");
    assert_eq!(
        details["fingerprint"],
        fake.certificate_fingerprint().as_str(),
        "{details}"
    );
    assert_eq!(fake.total_requests(), 0);
}

// --- `proxmoxer fingerprint URL` ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fingerprint_command_prints_the_presented_fingerprint_and_sends_no_credentials() {
    let fake = tls_fake().await;
    let output = fingerprint_command(fake.url()).await;
    assert!(output.status.success(), "{}", describe(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed.trim(),
        fake.certificate_fingerprint(),
        "{}",
        describe(&output)
    );

    assert!(fake.total_requests() <= 1, "{:?}", fake.recorded_requests());
    for request in fake.recorded_requests() {
        assert!(
            request.headers.get("authorization").is_none()
                && request.headers.get("cookie").is_none()
                && request.body.is_empty(),
            "the fingerprint command sent credentials: {request:?}"
        );
    }

    // What it prints is what registration accepts.
    let app = fast_daemon().spawn().await;
    register(&app, &pinned_body(&fake, "from-cli", printed.trim())).await;

    // After a renewal it shows the new certificate, also under the host name.
    fake.rotate_certificate();
    let by_name = format!("https://localhost:{}", fake.addr().port());
    let output = fingerprint_command(by_name).await;
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        fake.certificate_fingerprint(),
        "{}",
        describe(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fingerprint_command_fails_for_a_plain_http_url() {
    let fake = FakePve::start().await;
    let output = fingerprint_command(fake.url()).await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(output.stdout.is_empty(), "{}", describe(&output));
    assert!(!output.stderr.is_empty(), "{}", describe(&output));
}
