//! Registering and monitoring with a Proxmox API token instead of a password.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_pve::FakePve;
use crate::helpers::{
    STATUS_PATH, TICKET_PATH, TestApp, assert_status_read_with_token, cluster_count, fake_pve,
    fast_daemon, fetch_cluster, id_of, register, wait_until,
};

const TOKEN_USER: &str = "monitor@pve";
const TOKEN_NAME: &str = "health";
const TOKEN_SECRET: &str = "0c6c6c3e-1111-2222-3333-444455556666";

fn token_body(fake: &FakePve, name: &str) -> Value {
    json!({
        "name": name,
        "api_endpoint": fake.url(),
        "username": TOKEN_USER,
        "token_id": TOKEN_NAME,
        "token_secret": TOKEN_SECRET,
    })
}

#[tokio::test]
async fn a_token_registers_and_is_monitored_without_any_ticket_login() {
    let fake = FakePve::start().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let app = fast_daemon().spawn().await;

    let response = app.post_clusters(&token_body(&fake, "prod")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.expect("JSON");
    assert_eq!(created["auth_method"], "token");
    assert_eq!(created["status"], "healthy");
    assert!(!created.to_string().contains(TOKEN_SECRET));

    assert_status_read_with_token(&fake, TOKEN_USER, TOKEN_NAME, TOKEN_SECRET);

    let seen = fake.requests(STATUS_PATH);
    assert!(
        wait_until(
            async || fake.requests(STATUS_PATH) >= seen + 5,
            Duration::from_secs(10)
        )
        .await,
        "the monitor keeps checking"
    );
    let id = created["id"].as_str().expect("id");
    assert_eq!(fetch_cluster(&app, id).await["status"], "healthy");
    assert_eq!(
        fake.logins() + fake.failed_logins(),
        0,
        "a token never logs in"
    );
    assert_eq!(fake.requests(TICKET_PATH), 0);
    assert!(!app.logs().contains(TOKEN_SECRET));
}

#[tokio::test]
async fn the_full_token_id_form_is_accepted() {
    let fake = FakePve::start().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let app = TestApp::spawn().await;
    let mut body = token_body(&fake, "prod");
    body["token_id"] = json!(format!("{TOKEN_USER}!{TOKEN_NAME}"));
    assert_eq!(app.post_clusters(&body).await.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_token_secret_survives_a_restart_encrypted() {
    let fake = FakePve::start().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let mut app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &token_body(&fake, "prod")).await);
    app.terminate().await;
    let database = std::fs::read(app.db_path()).expect("read database");
    assert!(
        !database
            .windows(TOKEN_SECRET.len())
            .any(|w| w == TOKEN_SECRET.as_bytes())
    );

    app.restart().await;
    let seen = fake.requests(STATUS_PATH);
    assert!(
        wait_until(
            async || fake.requests(STATUS_PATH) > seen
                && fetch_cluster(&app, &id).await["status"] == "healthy",
            Duration::from_secs(10)
        )
        .await,
        "the restarted daemon monitors with the stored token"
    );
    assert_eq!(fetch_cluster(&app, &id).await["auth_method"], "token");
}

#[tokio::test]
async fn a_bad_token_is_401() {
    let fake = FakePve::start().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    fake.set_auth_failure_delay(Duration::from_millis(200));
    let app = TestApp::spawn().await;
    let mut body = token_body(&fake, "prod");
    body["token_secret"] = json!("11111111-2222-3333-4444-555555555555");

    let response = app.post_clusters(&body).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(error["message"], "Authentication failed");
    assert_eq!(cluster_count(&app).await, 0);
}

#[tokio::test]
async fn a_token_without_privileges_is_403_naming_sys_audit() {
    let fake = FakePve::start().await;
    // A new token has privilege separation and no rights of its own.
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, false);
    let app = TestApp::spawn().await;

    let response = app.post_clusters(&token_body(&fake, "prod")).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let error: Value = response.json().await.expect("JSON");
    assert_eq!(error["code"], "Forbidden");
    assert_eq!(error["message"], "Insufficient privileges on Proxmox");
    assert_eq!(error["details"]["privilege"], "Sys.Audit");
}

#[tokio::test]
async fn a_revoked_token_makes_the_cluster_unhealthy_and_attempts_back_off() {
    let fake = fake_pve().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &token_body(&fake, "prod")).await);

    fake.remove_token(TOKEN_USER, TOKEN_NAME);
    assert!(
        wait_until(
            async || fetch_cluster(&app, &id).await["status_reason"] == "auth_failed",
            Duration::from_secs(10)
        )
        .await,
        "a revoked token is an authentication failure"
    );
    let view = fetch_cluster(&app, &id).await;
    assert_eq!(view["status"], "unhealthy");
    assert_eq!(view["last_error"], "authentication failed");

    // Over 30 intervals, rejected attempts are spaced out instead of one per check.
    let before = fake.requests(STATUS_PATH);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let attempts = fake.requests(STATUS_PATH) - before;
    assert!(
        attempts <= 5,
        "{attempts} attempts with a revoked token in 30 intervals"
    );
}

#[tokio::test]
async fn a_token_losing_its_rights_makes_the_cluster_forbidden_until_granted_again() {
    let fake = FakePve::start().await;
    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    let app = fast_daemon().spawn().await;
    let id = id_of(&register(&app, &token_body(&fake, "prod")).await);

    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, false);
    assert!(
        wait_until(
            async || fetch_cluster(&app, &id).await["status_reason"] == "forbidden",
            Duration::from_secs(10)
        )
        .await,
        "403 on cluster status is forbidden"
    );
    assert_eq!(fetch_cluster(&app, &id).await["status"], "unhealthy");

    fake.add_token(TOKEN_USER, TOKEN_NAME, TOKEN_SECRET, true);
    assert!(
        wait_until(
            async || fetch_cluster(&app, &id).await["status"] == "healthy",
            Duration::from_secs(10)
        )
        .await,
        "one good check heals it"
    );
}

#[tokio::test]
async fn credentials_must_be_a_password_or_a_complete_token() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    let base = token_body(&fake, "prod");
    let with = |changes: Value| {
        let mut body = base.clone();
        for (key, value) in changes.as_object().expect("object") {
            if value.is_null() {
                body.as_object_mut().expect("object").remove(key);
            } else {
                body[key] = value.clone();
            }
        }
        body
    };
    let cases = [
        (
            with(json!({ "password": "pw" })),
            "Give either a password or an API token, not both",
        ),
        (
            with(json!({ "token_secret": null })),
            "Token secret is required",
        ),
        (with(json!({ "token_id": null })), "Token ID is required"),
        (
            with(json!({ "token_id": null, "token_secret": null })),
            "Password is required",
        ),
        (with(json!({ "token_id": "1bad" })), "Token ID is invalid"),
        (
            with(json!({ "token_id": "root@pam!health" })),
            "Token ID is invalid",
        ),
        (
            with(json!({ "token_secret": 42 })),
            "Field token_secret must be a string",
        ),
        (
            with(json!({ "token_secret": "abc\ndef" })),
            "Token secret is invalid",
        ),
        (
            with(json!({ "token_secret": "a;b" })),
            "Token secret is invalid",
        ),
    ];
    for (body, message) in cases {
        let response = app.post_clusters(&body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let error: Value = response.json().await.expect("JSON");
        assert_eq!(error["code"], "BadRequest");
        assert_eq!(error["message"], message, "{body} -> {error}");
    }
    assert_eq!(fake.total_requests(), 0, "nothing invalid reaches Proxmox");
}
