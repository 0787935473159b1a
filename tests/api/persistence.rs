//! What survives restarts and crashes, what a second daemon or a wrong key does, and where
//! credentials must never show up.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fake_pve::FakePve;
use crate::helpers::{
    TestApp, fetch_cluster, id_of, list_clusters, register, register_body, register_fake,
    wait_until,
};

async fn list(app: &TestApp) -> Vec<Value> {
    list_clusters(app).await["clusters"]
        .as_array()
        .cloned()
        .expect("clusters array")
}

fn identity(cluster: &Value) -> (Value, Value, Value, Value) {
    (
        cluster["id"].clone(),
        cluster["name"].clone(),
        cluster["api_endpoint"].clone(),
        cluster["created_at"].clone(),
    )
}

#[tokio::test]
async fn a_restart_keeps_every_cluster() {
    let fake = FakePve::start().await;
    let mut app = TestApp::spawn().await;
    let first = register_fake(&app, &fake, "first").await;
    let second = register_fake(&app, &fake, "second").await;

    app.restart().await;

    let after: Vec<_> = list(&app).await.iter().map(identity).collect();
    assert_eq!(after, vec![identity(&second), identity(&first)]);
    let fetched = fetch_cluster(&app, &id_of(&first)).await;
    assert_eq!(fetched["proxmox_version"], "8.4.1");
    assert_eq!(fetched["node_count"], 3);
    assert!(
        app.all_logs().contains("clusters=2"),
        "the daemon loaded both at start"
    );
}

#[tokio::test]
async fn a_crash_loses_nothing_that_was_acknowledged() {
    let fake = FakePve::start().await;
    let mut app = TestApp::spawn().await;
    let kept = register_fake(&app, &fake, "kept").await;
    let removed = register_fake(&app, &fake, "removed").await;
    let response = app.delete_cluster(id_of(&removed)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // No grace: SIGKILL right after the acknowledgements.
    app.kill9().await;
    app.restart().await;

    let after: Vec<_> = list(&app).await.iter().map(identity).collect();
    assert_eq!(after, vec![identity(&kept)]);
}

#[tokio::test]
async fn a_second_daemon_on_the_same_database_fails_and_changes_nothing() {
    let fake = FakePve::start().await;
    let app = TestApp::spawn().await;
    register_fake(&app, &fake, "prod").await;
    let db_before = std::fs::read(app.db_path()).expect("read database");
    let key_before = std::fs::read(app.key_path()).expect("read key");

    let (status, stderr) = app
        .second_instance()
        .env("PROXMOXER_LISTEN", "127.0.0.1:0")
        .spawn_expect_failure()
        .await;
    assert!(!status.success());
    assert!(stderr.contains("in use by another process"), "{stderr}");

    assert_eq!(
        std::fs::read(app.db_path()).expect("read database"),
        db_before
    );
    assert_eq!(std::fs::read(app.key_path()).expect("read key"), key_before);
    assert_eq!(list(&app).await.len(), 1, "the first daemon still serves");
}

#[tokio::test]
async fn passwords_never_reach_the_database_logs_or_responses() {
    let fake = FakePve::start().await;
    let password = "Tr0ub4dor&3-unique-to-this-test";
    fake.add_user("monitor@pve", password);
    let mut app = TestApp::spawn().await;
    let body = json!({
        "name": "prod",
        "api_endpoint": fake.url(),
        "username": "monitor@pve",
        "password": password,
    });
    let created = register(&app, &body).await;
    assert!(!created.to_string().contains(password));
    let listed = app.get_clusters().await.text().await.expect("text");
    assert!(!listed.contains(password));

    // A failed registration with another secret must not leak it either.
    let mut wrong = body.clone();
    wrong["name"] = json!("other");
    wrong["password"] = json!("wrong-secret-unique-to-this-test");
    let refused = app.post_clusters(&wrong).await.text().await.expect("text");
    assert!(!refused.contains("wrong-secret-unique-to-this-test"));

    app.terminate().await;
    let database = std::fs::read(app.db_path()).expect("read database");
    for secret in [password, "wrong-secret-unique-to-this-test"] {
        assert!(
            !database
                .windows(secret.len())
                .any(|w| w == secret.as_bytes()),
            "{secret} found in the database file"
        );
        assert!(
            !app.all_logs().contains(secret),
            "{secret} found in the logs"
        );
    }

    // Still decryptable: after a restart the monitor logs in with it. Counted before the
    // restart: the first check may come right after the daemon starts listening.
    let logins_before = fake.logins();
    app.restart().await;
    assert!(
        wait_until(
            async || fake.logins() > logins_before,
            Duration::from_secs(15)
        )
        .await,
        "the restarted daemon logs in with the stored password"
    );
}

#[tokio::test]
async fn the_database_and_key_are_private_files() {
    let app = TestApp::spawn().await;
    for path in [app.db_path(), app.key_path()] {
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
}

#[tokio::test]
async fn a_missing_key_stops_the_daemon_and_no_new_key_is_made() {
    let fake = FakePve::start().await;
    let mut app = TestApp::spawn().await;
    register_fake(&app, &fake, "prod").await;
    app.terminate().await;
    std::fs::remove_file(app.key_path()).expect("remove key");

    let (_, stderr) = app.second_instance().spawn_expect_failure().await;
    assert!(
        stderr.contains("key file") && stderr.contains("missing"),
        "{stderr}"
    );
    assert!(
        !app.key_path().exists(),
        "no key may be generated over existing secrets"
    );
}

#[tokio::test]
async fn another_key_stops_the_daemon() {
    let fake = FakePve::start().await;
    let mut app = TestApp::spawn().await;
    register_fake(&app, &fake, "prod").await;
    app.terminate().await;
    let other_key = "ab".repeat(32);
    std::fs::write(app.key_path(), format!("{other_key}\n")).expect("replace key");

    let (_, stderr) = app.second_instance().spawn_expect_failure().await;
    assert!(stderr.contains("does not match"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(app.key_path()).expect("key").trim(),
        other_key,
        "the key file is left as it was"
    );
}

#[tokio::test]
async fn a_key_file_can_be_configured() {
    let builder = TestApp::builder();
    let key = builder.data_dir().join("keys").join("custom.key");
    let app = builder
        .env("PROXMOXER_KEY_FILE", key.display().to_string())
        .spawn()
        .await;
    assert!(key.exists());
    assert_eq!(app.key_path(), key);
    assert!(
        !app.data_dir().join("proxmoxer.key").exists(),
        "the default location is not used"
    );
}

#[tokio::test]
async fn invalid_configuration_exits_naming_the_key() {
    let (_, stderr) = TestApp::builder()
        .env("PROXMOXER_MONITOR_INTERVAL", "often")
        .spawn_expect_failure()
        .await;
    assert!(stderr.contains("PROXMOXER_MONITOR_INTERVAL"), "{stderr}");

    let (_, stderr) = TestApp::builder()
        .config_toml("[monitor]\ninterval = \"30s\"\nfailure_treshold = 3\n")
        .spawn_expect_failure()
        .await;
    assert!(stderr.contains("failure_treshold"), "{stderr}");

    let (_, stderr) = TestApp::builder()
        .env("PROXMOXER_LISTEN", "localhost")
        .spawn_expect_failure()
        .await;
    assert!(stderr.contains("PROXMOXER_LISTEN"), "{stderr}");
}

#[tokio::test]
async fn a_configuration_file_is_honoured() {
    let fake = FakePve::start().await;
    let builder = TestApp::builder();
    let database = builder.data_dir().join("from-file.redb");
    let app = builder
        .env_remove("PROXMOXER_DATABASE")
        .config_toml(&format!(
            "[storage]\ndatabase = \"{}\"\n[monitor]\ninterval = \"200ms\"\n",
            database.display()
        ))
        .spawn()
        .await;
    register_fake(&app, &fake, "prod").await;
    assert!(database.exists());
    let before = fake.requests("/api2/json/cluster/status");
    assert!(
        wait_until(
            async || fake.requests("/api2/json/cluster/status") >= before + 3,
            Duration::from_secs(10)
        )
        .await,
        "the 200ms interval from the file drives the monitor"
    );
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_registration_finish_and_exits_zero() {
    let fake = FakePve::start().await;
    fake.set_latency(Duration::from_secs(1));
    let mut app = TestApp::spawn().await;

    let request = app
        .client
        .post(app.api_url("/clusters"))
        .json(&register_body(&fake, "in-flight"));
    let registration = tokio::spawn(async move { request.send().await });
    assert!(
        wait_until(async || fake.total_requests() > 0, Duration::from_secs(10)).await,
        "the registration reached Proxmox"
    );

    let status = app.terminate().await;
    assert!(status.success(), "exit status {status}");
    let response = registration
        .await
        .expect("task")
        .expect("an answer before the exit");
    assert_eq!(response.status(), StatusCode::CREATED);

    app.restart().await;
    assert_eq!(
        list(&app).await.len(),
        1,
        "the acknowledged registration was kept"
    );
    assert!(app.all_logs().contains("stopped"));
}
