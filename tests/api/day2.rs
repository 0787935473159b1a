//! Day-2 operations: changing a cluster's settings with `PATCH` and checking it now.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_pve::{DEFAULT_PASSWORD, DEFAULT_USER, FakePve};
use crate::helpers::*;

const NEW_PASSWORD: &str = "rotated-password-7781";
const TOKEN_NAME: &str = "monitoring";
const TOKEN_SECRET: &str = "5f0e2a8e-40b1-4c52-9f0e-4a3c1d2b7e61";

async fn patch(app: &TestApp, id: &str, body: &Value) -> (StatusCode, Value) {
    patch_raw(app, id, "application/json", body.to_string()).await
}

async fn patch_raw(
    app: &TestApp,
    id: &str,
    content_type: &str,
    body: String,
) -> (StatusCode, Value) {
    let response = app
        .client
        .patch(app.api_url(&format!("/clusters/{id}")))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("PATCH");
    json_of(response).await
}

async fn check_now(app: &TestApp, id: &str) -> (StatusCode, Value) {
    let response = app
        .client
        .post(app.api_url(&format!("/clusters/{id}/check")))
        .send()
        .await
        .expect("POST check");
    json_of(response).await
}

/// The history's transitions, newest first.
async fn transitions(app: &TestApp, id: &str) -> Vec<Value> {
    let (status, body) = history(app, id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["transitions"].as_array().cloned().unwrap_or_default()
}

fn settings_changes(history: &[Value]) -> Vec<Value> {
    history
        .iter()
        .filter(|t| t["reason"] == "settings_changed")
        .map(|t| t["fields"].clone())
        .collect()
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, code: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert!(
        body["details"].is_object() || body["details"].is_null(),
        "{body}"
    );
}

#[tokio::test]
async fn renaming_needs_no_proxmox_call_and_a_taken_name_is_409() {
    let fake = FakePve::start().await;
    let app = daemon_checking_every("1h", "2s").spawn().await;
    let prod = register_fake(&app, &fake, "prod").await;
    let id = id_of(&prod);
    register_fake(&app, &fake, "lab").await;
    // Past the first checks and the member probes after them.
    wait_for_member_probes(&app, &id).await;
    let requests = fake.total_requests();

    let (status, body) = patch(&app, &id, &json!({ "name": "production" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "production");
    assert_eq!(body["id"], prod["id"]);
    assert_eq!(body["created_at"], prod["created_at"]);
    // Shown to the second: a rename within the registration's second shows the same.
    assert!(timestamp(&body, "updated_at") >= timestamp(&prod, "updated_at"));
    assert_eq!(
        fake.total_requests(),
        requests,
        "a rename asks Proxmox nothing"
    );
    assert_eq!(fetch_cluster(&app, &id).await["name"], "production");
    assert_eq!(
        settings_changes(&transitions(&app, &id).await),
        vec![json!(["name"])]
    );

    let (status, body) = patch(&app, &id, &json!({ "name": "lab" })).await;
    assert_error(status, &body, StatusCode::CONFLICT, "Conflict");
    assert_eq!(body["message"], "Cluster already exists");
    assert_eq!(fetch_cluster(&app, &id).await["name"], "production");

    // The old name is free again; the new one survives a restart.
    register_fake(&app, &fake, "prod").await;
    let mut app = app;
    app.restart().await;
    assert_eq!(fetch_cluster(&app, &id).await["name"], "production");
}

#[tokio::test]
async fn an_empty_patch_changes_nothing_and_bad_bodies_are_refused() {
    let fake = FakePve::start().await;
    let app = daemon_checking_every("1h", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    let before = wait_for_member_probes(&app, &id).await;
    let requests = fake.total_requests();

    let (status, body) = patch(&app, &id, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["updated_at"], before["updated_at"]);
    let (status, body) = patch_raw(&app, &id, "application/merge-patch+json", "{}".into()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let cases = [
        (json!({ "nmae": "x" }), "nmae"),
        (json!({ "name": 5 }), "name"),
        (json!({ "username": null }), "username"),
        (json!({ "name": "" }), "name"),
        (json!({ "api_endpoint": "ftp://pve" }), "api_endpoint"),
        (json!({ "fingerprint": "not-a-fingerprint" }), "fingerprint"),
        (json!({ "password": "" }), "password"),
    ];
    for (sent, field) in cases {
        let (status, body) = patch(&app, &id, &sent).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequest");
        assert_eq!(body["details"]["field"], field, "{sent} -> {body}");
    }
    let (status, body) = patch(
        &app,
        &id,
        &json!({ "password": "x", "token_id": TOKEN_NAME, "token_secret": TOKEN_SECRET }),
    )
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequest");
    // A token id alone on a password cluster has no secret to go with it.
    let (status, body) = patch(&app, &id, &json!({ "token_id": TOKEN_NAME })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequest");
    assert_eq!(body["details"]["field"], "token_secret", "{body}");
    // A pin needs https.
    let (status, body) = patch(&app, &id, &json!({ "fingerprint": fake_fingerprint() })).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequest");
    assert_eq!(body["details"]["field"], "fingerprint", "{body}");

    let (status, body) = patch_raw(&app, &id, "text/plain", "{}".into()).await;
    assert_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
    );
    let (status, body) = patch_raw(&app, &id, "application/json", "{".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let unknown = uuid::Uuid::now_v7().to_string();
    let (status, body) = patch(&app, &unknown, &json!({ "name": "x" })).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "NotFound");
    assert_eq!(body["message"], "Cluster not found");

    let after = fetch_cluster(&app, &id).await;
    assert_eq!(after["updated_at"], before["updated_at"]);
    assert_eq!(after["name"], "prod");
    assert_eq!(fake.total_requests(), requests, "nothing was verified");
    assert!(settings_changes(&transitions(&app, &id).await).is_empty());
}

fn fake_fingerprint() -> String {
    vec!["AB"; 32].join(":")
}

#[tokio::test]
async fn a_rotated_password_heals_an_auth_failed_cluster_and_keeps_its_id_and_history() {
    let fake = fake_pve().await;
    let app = daemon_checking_every("200ms", "2s").spawn().await;
    let registered = register_fake(&app, &fake, "prod").await;
    let id = id_of(&registered);
    fake.set_password(DEFAULT_USER, NEW_PASSWORD);
    fake.invalidate_tickets();
    wait_for_cluster(&app, &id, "auth_failed", |c| {
        has_status(c, "unhealthy", "auth_failed")
    })
    .await;

    let (status, body) = patch(&app, &id, &json!({ "password": NEW_PASSWORD })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(is_healthy(&body), "{body}");
    assert_eq!(body["id"], registered["id"]);
    assert_eq!(body["created_at"], registered["created_at"]);
    // The monitor runs on the new password at once, past its login back-off.
    let checks = fake.requests("/api2/json/cluster/status");
    wait_for_cluster(&app, &id, "checks with the new password", is_healthy).await;
    assert!(
        wait_until(
            async || fake.requests("/api2/json/cluster/status") > checks,
            WAIT
        )
        .await
    );

    let transitions = transitions(&app, &id).await;
    assert_eq!(settings_changes(&transitions), vec![json!(["password"])]);
    assert!(
        transitions.iter().any(|t| t["reason"] == "auth_failed"),
        "the history from before the change is kept: {transitions:?}"
    );
    let text = serde_json::to_string(&transitions).unwrap_or_default();
    assert!(!text.contains(NEW_PASSWORD));
    assert!(!app.logs().contains(NEW_PASSWORD));

    // Stored sealed, and used after a restart.
    let mut app = app;
    app.restart().await;
    wait_for_cluster_skipping_stale(&app, &id, "healthy after a restart", is_healthy).await;
    let database = std::fs::read(app.db_path()).expect("read the database");
    assert!(
        !database
            .windows(NEW_PASSWORD.len())
            .any(|w| w == NEW_PASSWORD.as_bytes())
    );
}

#[tokio::test]
async fn a_wrong_new_password_is_401_and_the_old_one_goes_on_working() {
    let fake = fake_pve().await;
    let app = daemon_checking_every("200ms", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    let before = wait_for_member_probes(&app, &id).await;

    let (status, body) = patch(&app, &id, &json!({ "password": "not-the-password" })).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "Unauthorized");
    assert_eq!(body["message"], "Authentication failed");

    // Nothing changed: the monitor still logs in with the stored password.
    fake.invalidate_tickets();
    let logins = fake.logins();
    assert!(
        wait_until(async || fake.logins() > logins, WAIT).await,
        "the monitor logs in again"
    );
    let after = wait_for_cluster(&app, &id, "healthy", is_healthy).await;
    assert_eq!(after["updated_at"], before["updated_at"]);
    assert!(settings_changes(&transitions(&app, &id).await).is_empty());
    assert!(!app.logs().contains("not-the-password"));
}

#[tokio::test]
async fn a_cluster_switches_from_password_to_token_and_back() {
    let fake = fake_pve().await;
    fake.add_token(DEFAULT_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let app = daemon_checking_every("200ms", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;

    let (status, body) = patch(
        &app,
        &id,
        &json!({ "token_id": TOKEN_NAME, "token_secret": TOKEN_SECRET }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["auth_method"], "token");
    assert!(is_healthy(&body), "{body}");
    let checks = fake.requests("/api2/json/cluster/status");
    assert!(
        wait_until(
            async || fake.requests("/api2/json/cluster/status") > checks + 1,
            WAIT
        )
        .await
    );
    assert_status_read_with_token(&fake, DEFAULT_USER, TOKEN_NAME, TOKEN_SECRET);

    // A wrong secret alone is verified with the stored token id, and refused.
    let (status, body) = patch(&app, &id, &json!({ "token_secret": "wrong-secret" })).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "Unauthorized");
    assert_eq!(fetch_cluster(&app, &id).await["auth_method"], "token");

    let (status, body) = patch(&app, &id, &json!({ "password": DEFAULT_PASSWORD })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["auth_method"], "password");
    let logins = fake.logins();
    fake.invalidate_tickets();
    assert!(
        wait_until(async || fake.logins() > logins, WAIT).await,
        "the monitor logs in with the password again"
    );
    wait_for_cluster(&app, &id, "healthy on the password", is_healthy).await;
    let changes = settings_changes(&transitions(&app, &id).await);
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(
        !serde_json::to_string(&changes)
            .unwrap_or_default()
            .contains(TOKEN_SECRET)
    );
}

#[tokio::test]
async fn a_renewed_certificate_is_pinned_again() {
    let fake = tls_fake().await;
    let app = daemon_checking_every("200ms", "2s").spawn().await;
    let mut body = register_body(&fake, "prod");
    body["fingerprint"] = json!(fake.certificate_fingerprint());
    let id = id_of(&register(&app, &body).await);

    fake.rotate_certificate();
    wait_for_cluster(&app, &id, "tls_error", |c| {
        has_status(c, "unhealthy", "tls_error")
    })
    .await;

    let (status, refused) = patch(&app, &id, &json!({ "fingerprint": fake_fingerprint() })).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{refused}");

    let renewed = fake.certificate_fingerprint();
    let (status, body) = patch(&app, &id, &json!({ "fingerprint": renewed })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(is_healthy(&body), "{body}");
    assert_eq!(
        body["fingerprint"].as_str().map(str::to_ascii_uppercase),
        Some(renewed.to_ascii_uppercase())
    );
    wait_for_cluster_skipping_stale(&app, &id, "healthy on the new pin", is_healthy).await;
    assert_eq!(
        settings_changes(&transitions(&app, &id).await),
        vec![json!(["fingerprint"])]
    );
}

#[tokio::test]
async fn check_now_answers_with_the_fresh_state_and_overlapping_calls_share_one_check() {
    let fake = FakePve::start().await;
    let app = daemon_checking_every("1h", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    wait_for_member_probes(&app, &id).await;

    fake.set_node_online("pve2", false);
    let (status, body) = check_now(&app, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(has_status(&body, "degraded", "node_offline"), "{body}");

    // A slow Proxmox keeps the check in flight while the other requests arrive.
    fake.set_node_online("pve2", true);
    fake.set_latency(Duration::from_millis(800));
    let checks = fake.requests("/api2/json/cluster/status");
    let answers = futures_util::future::join_all((0..5).map(|_| check_now(&app, &id))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert!(is_healthy(body), "{body}");
    }
    assert_eq!(
        fake.requests("/api2/json/cluster/status"),
        checks + 1,
        "five overlapping requests, one check"
    );

    // A failed check is still an answer.
    fake.set_latency(Duration::ZERO);
    fake.set_down(true);
    let (status, body) = check_now(&app, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["last_error"].is_string(), "{body}");

    let unknown = uuid::Uuid::now_v7().to_string();
    let (status, body) = check_now(&app, &unknown).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "NotFound");
}

#[tokio::test]
async fn check_now_tries_a_login_past_the_back_off() {
    let fake = fake_pve().await;
    let app = daemon_checking_every("200ms", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    fake.set_password(DEFAULT_USER, NEW_PASSWORD);
    fake.invalidate_tickets();
    wait_for_cluster(&app, &id, "auth_failed", |c| {
        has_status(c, "unhealthy", "auth_failed")
    })
    .await;
    // Fixed on the Proxmox side; the back-off would hold the next attempt for a while.
    fake.set_password(DEFAULT_USER, DEFAULT_PASSWORD);
    let (status, body) = check_now(&app, &id).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(is_healthy(&body), "{body}");
}

#[tokio::test]
async fn a_deletion_racing_a_change_is_never_undone() {
    let fake = fake_pve().await;
    let app = daemon_checking_every("1h", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;
    fake.set_latency(Duration::from_millis(700));

    let change = {
        let client = app.client.clone();
        let url = app.api_url(&format!("/clusters/{id}"));
        tokio::spawn(async move {
            client
                .patch(url)
                .json(&json!({ "password": DEFAULT_PASSWORD }))
                .send()
                .await
                .expect("PATCH")
                .status()
        })
    };
    assert!(
        wait_until(async || fake.logins() >= 2, WAIT).await,
        "the change is being verified"
    );
    let deleted = app.delete_cluster(&id).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(change.await.expect("PATCH task"), StatusCode::NOT_FOUND);
    assert_eq!(app.get_cluster(&id).await.status(), StatusCode::NOT_FOUND);

    let mut app = app;
    app.restart().await;
    assert_eq!(app.get_cluster(&id).await.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn concurrent_changes_of_one_cluster_apply_one_after_the_other() {
    let fake = fake_pve().await;
    fake.set_latency(Duration::from_millis(200));
    let app = daemon_checking_every("1h", "2s").spawn().await;
    let id = register_fake_id(&app, &fake, "prod").await;

    let changes = ["prod-a", "prod-b", "prod-c"].map(|name| {
        let client = app.client.clone();
        let url = app.api_url(&format!("/clusters/{id}"));
        tokio::spawn(async move {
            // Each also sends a password, so each is verified with Proxmox and takes a while.
            let response = client
                .patch(url)
                .json(&json!({ "name": name, "password": DEFAULT_PASSWORD }))
                .send()
                .await
                .expect("PATCH");
            json_of(response).await
        })
    });
    for change in changes {
        let (status, body) = change.await.expect("PATCH task");
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Each was applied on top of the one before: each renamed, none saw a new password.
    let changes = settings_changes(&transitions(&app, &id).await);
    assert_eq!(changes, vec![json!(["name"]); 3]);
    let last = fetch_cluster(&app, &id).await;
    assert!(
        ["prod-a", "prod-b", "prod-c"].contains(&last["name"].as_str().unwrap_or_default()),
        "{last}"
    );
    assert_eq!(cluster_count(&app).await, 1);
}
